-- Shared by the grant scripts (Lock, RLock, Semaphore, BoundedSemaphore, and Condition's lock).
-- Keys of one grant object, all under one hash tag:
--   KEYS[1] state hash    value (free permits), bound (most permits, -1: none), kind,
--                         next_expiry (no grant lapses before it, ms), refreshed (ms),
--                         nwait (entries in the waiters list; never below the real count)
--   KEYS[2] holders hash  grant id -> "<holder>|<lease expiry ms>|<count>", plus the field '_'
--                         that keeps the hash (and its TTL) alive while no grant exists. A lease
--                         expiry of 0 means no lease: the holder's process exited normally and
--                         the hold stays until released (grants_detach.lua)
--   KEYS[3] waiters list  waiter ids, first come first served
--   KEYS[4] waiting hash  waiter id -> "<liveness deadline ms>|<holder>"
--   KEYS[5] fence         counter; every grant id is a new value: a fencing token
-- A waiter's wake key is ARGV[4] .. <waiter id> (same hash tag); a grant is pushed there.
-- ARGV[1] now (ms), ARGV[2] TTL (s), ARGV[3] lease (ms), ARGV[4] wake key prefix.
--
-- Cost: every redis.call from Lua costs 1.5-2 us, so calls are few: the state is read in one
-- HMGET; lapsed grants are looked for (HGETALL) only once the earliest lease expiry passed; the
-- waiters list is touched only when nwait says it has entries; TTLs are refreshed every tenth of
-- the TTL, not on every call.
local now = tonumber(ARGV[1])
local ttl = ARGV[2]
local lease = tonumber(ARGV[3])
local wake_prefix = ARGV[4]

local state = redis.call('HMGET', KEYS[1], 'value', 'bound', 'next_expiry', 'refreshed', 'nwait')
if not state[1] and not state[2] then
  if redis.call('EXISTS', KEYS[1]) == 0 then
    return redis.error_reply('GONE the object does not exist')
  end
end
local value = tonumber(state[1])
local bound = tonumber(state[2])
if value == nil or bound == nil then
  return redis.error_reply('CORRUPT the state is not a permit count')
end
local next_expiry = tonumber(state[3]) or 0
local refreshed = tonumber(state[4]) or 0
-- Unknown (an object from before the field existed): assume there may be waiters.
local nwait = tonumber(state[5]) or 1
local dirty = false

local function parse_grant(record)
  local holder, expiry, count = string.match(record, '^(.*)|(%d+)|(%d+)$')
  return holder, tonumber(expiry), tonumber(count)
end

local function add_permits(n)
  value = value + n
  if bound >= 0 and value > bound then
    value = bound
  end
  dirty = true
end

-- Grants whose lease lapsed (their holder died) give their permit back; next_expiry becomes
-- the earliest expiry left. Grants without a lease (expiry 0) never lapse.
local function reclaim()
  if next_expiry == 0 or next_expiry >= now then
    return
  end
  local earliest = 0
  local all = redis.call('HGETALL', KEYS[2])
  for i = 1, #all, 2 do
    local _, expiry = parse_grant(all[i + 1])
    if all[i] == '_' or expiry == 0 then
      -- the sentinel, or a hold without a lease
    elseif expiry == nil or expiry < now then
      redis.call('HDEL', KEYS[2], all[i])
      add_permits(1)
    elseif earliest == 0 or expiry < earliest then
      earliest = expiry
    end
  end
  next_expiry = earliest
  dirty = true
end

local function note_expiry(expiry)
  if next_expiry == 0 or expiry < next_expiry then
    next_expiry = expiry
    dirty = true
  end
end

local function new_grant(holder)
  local id = redis.call('INCR', KEYS[5])
  redis.call('HSET', KEYS[2], id, holder .. '|' .. (now + lease) .. '|1')
  if id == 1 then
    redis.call('EXPIRE', KEYS[5], ttl)
  end
  note_expiry(now + lease)
  return id
end

local function queue_waiter(waiter, record)
  local length = redis.call('RPUSH', KEYS[3], waiter)
  if length == 1 then
    redis.call('EXPIRE', KEYS[3], ttl)
  end
  nwait = length
  dirty = true
  if redis.call('HSET', KEYS[4], waiter, record) == 1 and length == 1 then
    redis.call('EXPIRE', KEYS[4], ttl)
  end
end

-- The waiter left the queue without a grant (it gave up).
local function unqueue_waiter(waiter)
  local removed = redis.call('LREM', KEYS[3], 0, waiter)
  redis.call('HDEL', KEYS[4], waiter)
  if removed > 0 then
    nwait = math.max(nwait - removed, 0)
    dirty = true
  end
end

-- Free permits go to live waiters, in order; a waiter whose liveness deadline passed (it gave
-- up or died) is skipped.
local function grant_waiters()
  while value > 0 and nwait > 0 do
    local waiter = redis.call('LPOP', KEYS[3])
    if not waiter then
      nwait = 0
      dirty = true
      break
    end
    nwait = nwait - 1
    dirty = true
    local record = redis.call('HGET', KEYS[4], waiter)
    redis.call('HDEL', KEYS[4], waiter)
    if record then
      local deadline, holder = string.match(record, '^(%d+)|(.*)$')
      if tonumber(deadline) >= now then
        value = value - 1
        dirty = true
        local id = new_grant(holder)
        local wake = wake_prefix .. waiter
        redis.call('RPUSH', wake, id)
        redis.call('EXPIRE', wake, ttl)
      end
    end
  end
end

local function save()
  if now - refreshed > tonumber(ttl) * 100 then
    for i = 1, 5 do
      redis.call('EXPIRE', KEYS[i], ttl)
    end
    refreshed = now
    dirty = true
  end
  if dirty then
    redis.call('HSET', KEYS[1], 'value', value, 'next_expiry', next_expiry, 'refreshed', refreshed,
      'nwait', nwait)
  end
end
