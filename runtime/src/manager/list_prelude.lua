-- Shared by the list scripts (after container_prelude.lua).
-- KEYS[1] head hash: '\0v' the version, bumped by every write (sort's compare-and-set compares
--   it); '\0s' the shape, bumped by every write that moves items (insertions, deletions,
--   reverse, sort, clear; not `l[i] = x`): an iterator compares it; '\0f' while a sort runs,
--   '<token>|<deadline ms>' (Redis's clock): writes wait until the sort wrote or the deadline
--   passed; '\0r'.
-- KEYS[2] items list (encoded items), KEYS[3] the manager's container index, KEYS[4] its meta.

-- Redis's clock (ms). The freeze's deadline is set and checked by it, never by the callers'
-- clocks (ARGV[1]): a sorter whose clock is ahead that dies would otherwise freeze the list for
-- as long as its skew, and a writer whose clock is behind would wait as long. Read only where a
-- freeze is set or found (one call), not on every write.
local function redis_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- open() plus the shape, at [3], and the freeze, at [4]. `writer`: nil for a read (a freeze
-- does not matter), '' for a write, a sort's token for its own write: a write while another
-- caller's sort holds a live freeze fails with FROZEN (the caller waits and sends it again).
local function open_list(writer)
  local h, err = open('\0s', '\0f')
  if not h then
    return nil, err
  end
  if tonumber(h[3]) == nil then
    return nil, redis.error_reply('CORRUPT the list shape is not a number')
  end
  if writer ~= nil and h[4] then
    local sep = string.find(h[4], '|', 1, true)
    local deadline = sep and tonumber(string.sub(h[4], sep + 1))
    if deadline and deadline > redis_now() and string.sub(h[4], 1, sep - 1) ~= writer then
      return nil, redis.error_reply('FROZEN the list is being sorted')
    end
  end
  return h
end

-- Records a write; `moved`: items moved, the shape changes.
local function changed(h, moved)
  if moved then
    redis.call('HSET', KEYS[1], '\0v', tonumber(h[1]) + 1, '\0s', tonumber(h[3]) + 1)
  else
    redis.call('HSET', KEYS[1], '\0v', tonumber(h[1]) + 1)
  end
end

-- Python's index: a negative one counts from the end; nil when outside 0 .. n-1.
local function index(i, n)
  i = tonumber(i)
  if i == nil then
    return nil
  end
  if i < 0 then
    i = i + n
  end
  if i < 0 or i >= n then
    return nil
  end
  return i
end

-- Puts `values` (in their order) at the head of `key`, in batches that fit Lua's stack.
local function lpush_all(key, values)
  local j = #values
  while j >= 1 do
    local lo = math.max(1, j - 999)
    local args = {}
    for m = j, lo, -1 do
      args[#args + 1] = values[m]
    end
    redis.call('LPUSH', key, unpack(args))
    j = lo - 1
  end
end

-- Removes and returns the item at i (0 <= i < n), moving the shorter side.
local function remove_at(i, n)
  if i == 0 then
    return redis.call('LPOP', KEYS[2])
  end
  if i == n - 1 then
    return redis.call('RPOP', KEYS[2])
  end
  local value = redis.call('LINDEX', KEYS[2], i)
  if i < n / 2 then
    local before = redis.call('LRANGE', KEYS[2], 0, i - 1)
    redis.call('LTRIM', KEYS[2], i + 1, -1)
    lpush_all(KEYS[2], before)
  else
    local after = redis.call('LRANGE', KEYS[2], i + 1, -1)
    redis.call('LTRIM', KEYS[2], 0, i - 1)
    push_all(KEYS[2], after, 1, #after)
  end
  return value
end

-- Inserts `value` before position i (0 <= i <= n), moving the shorter side.
local function insert_at(i, n, value)
  if i == 0 then
    redis.call('LPUSH', KEYS[2], value)
  elseif i == n then
    redis.call('RPUSH', KEYS[2], value)
  elseif i < n / 2 then
    local before = redis.call('LRANGE', KEYS[2], 0, i - 1)
    redis.call('LTRIM', KEYS[2], i, -1)
    redis.call('LPUSH', KEYS[2], value)
    lpush_all(KEYS[2], before)
  else
    local after = redis.call('LRANGE', KEYS[2], i, -1)
    redis.call('LTRIM', KEYS[2], 0, i - 1)
    redis.call('RPUSH', KEYS[2], value)
    push_all(KEYS[2], after, 1, #after)
  end
  if n == 0 then
    -- The items list was created again: give it its TTL.
    redis.call('EXPIRE', KEYS[2], ttl)
  end
end
