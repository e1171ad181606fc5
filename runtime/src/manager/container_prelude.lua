-- Shared by the scripts of a Manager's containers (dict, list, Namespace).
-- KEYS[1] the container's head hash: '\0v' (its version, see each kind), '\0r' (when its TTLs
--   were last refreshed, ms) and, for a dict or a Namespace, its entries;
-- KEYS[2 .. #KEYS-2] the container's other keys; KEYS[#KEYS-1] the manager's container index (a
--   sorted set: '<kind>:<capability>' of each container, scored by when its TTLs were last
--   refreshed, ms); KEYS[#KEYS] the manager's meta hash.
-- ARGV[1] now (ms), ARGV[2] TTL (s); each script's own arguments follow.
--
-- The head always exists while the container does (it holds '\0v'), so a missing head means the
-- container is gone: its manager was shut down, or it was idle longer than the TTL.
-- Cost: every redis.call costs 1.5-2 us, so TTLs (the container's keys, the manager's index and
-- meta) are refreshed once a tenth of the TTL, or whenever the stored refresh time is ahead of
-- this caller's clock (clocks that disagree cause more refreshes, never fewer), not on every
-- call.
local now = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])

-- This container's member in the index: '<kind>:<capability>', the part of its head's key name
-- before the field (keys are '...:<kind>:<capability>:<field>', none of the three holds a ':').
local function member()
  return string.match(KEYS[1], '([^:]+:[^:]+):[^:]+$')
end

-- Refreshes the TTL of every key (the container's, the manager's index and meta) and records
-- when, in the head ('\0r') and in the index. The ZADD goes first: it makes the index again if it
-- was gone, and the EXPIRE after it gives it its TTL. GT: a caller whose clock is behind never
-- moves the score back, so the entry is not pruned while the keys live.
local function refresh()
  redis.call('ZADD', KEYS[#KEYS - 1], 'GT', now, member())
  for i = 1, #KEYS do
    redis.call('EXPIRE', KEYS[i], ttl)
  end
  redis.call('HSET', KEYS[1], '\0r', now)
end

-- Reads the head's version and refresh time, then `...` (more fields of the head), in one
-- HMGET, and refreshes the TTLs when due. Returns the reply (version at [1], the fields from
-- [3] on), or nil and the error reply to return.
local function open(...)
  local h = redis.call('HMGET', KEYS[1], '\0v', '\0r', ...)
  if not h[1] then
    return nil, redis.error_reply('GONE the container does not exist')
  end
  if tonumber(h[1]) == nil then
    return nil, redis.error_reply('CORRUPT the container version is not a number')
  end
  local refreshed = tonumber(h[2])
  if refreshed == nil or now - refreshed >= ttl * 100 or now < refreshed then
    refresh()
  end
  return h
end

-- Pushes values[from .. to] on the tail of `key` (RPUSH), in batches that fit Lua's stack.
-- Returns the list's length after (nil when nothing was pushed).
local function push_all(key, values, from, to)
  local i = from
  local len
  while i <= to do
    local j = math.min(i + 999, to)
    len = redis.call('RPUSH', key, unpack(values, i, j))
    i = j + 1
  end
  return len
end
