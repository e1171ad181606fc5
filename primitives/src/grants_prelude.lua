-- Shared by the grant scripts (Lock, RLock, Semaphore, BoundedSemaphore, and Condition's lock).
-- Keys of one grant object, all under one hash tag:
--   KEYS[1] state hash    value (free permits), bound (most permits, -1: none), kind
--   KEYS[2] holders hash  grant id -> "<holder>|<lease expiry ms>|<count>"
--   KEYS[3] waiters list  waiter ids, first come first served
--   KEYS[4] waiting hash  waiter id -> "<liveness deadline ms>|<holder>"
--   KEYS[5] fence         counter; every grant id is a new value: a fencing token
-- A waiter's wake key is ARGV[4] .. <waiter id> (same hash tag); a grant is pushed there.
-- ARGV[1] now (ms), ARGV[2] TTL (s), ARGV[3] lease (ms), ARGV[4] wake key prefix.
local now = tonumber(ARGV[1])
local ttl = ARGV[2]
local lease = tonumber(ARGV[3])
local wake_prefix = ARGV[4]

if redis.call('EXISTS', KEYS[1]) == 0 then
  return redis.error_reply('GONE the object does not exist')
end
local value = tonumber(redis.call('HGET', KEYS[1], 'value'))
local bound = tonumber(redis.call('HGET', KEYS[1], 'bound'))
if value == nil or bound == nil then
  return redis.error_reply('CORRUPT the state is not a permit count')
end

local function parse_grant(record)
  local holder, expiry, count = string.match(record, '^(.*)|(%d+)|(%d+)$')
  return holder, tonumber(expiry), tonumber(count)
end

local function add_permits(n)
  value = value + n
  if bound >= 0 and value > bound then
    value = bound
  end
end

-- Grants whose lease lapsed (their holder died) give their permit back.
local function reclaim()
  local all = redis.call('HGETALL', KEYS[2])
  for i = 1, #all, 2 do
    local _, expiry = parse_grant(all[i + 1])
    if expiry == nil or expiry < now then
      redis.call('HDEL', KEYS[2], all[i])
      add_permits(1)
    end
  end
end

local function new_grant(holder)
  local id = redis.call('INCR', KEYS[5])
  redis.call('HSET', KEYS[2], id, holder .. '|' .. (now + lease) .. '|1')
  return id
end

-- Free permits go to live waiters, in order; a waiter whose liveness deadline passed (it gave
-- up or died) is skipped.
local function grant_waiters()
  while value > 0 do
    local waiter = redis.call('LPOP', KEYS[3])
    if not waiter then
      break
    end
    local record = redis.call('HGET', KEYS[4], waiter)
    redis.call('HDEL', KEYS[4], waiter)
    if record then
      local deadline, holder = string.match(record, '^(%d+)|(.*)$')
      if tonumber(deadline) >= now then
        value = value - 1
        local id = new_grant(holder)
        local wake = wake_prefix .. waiter
        redis.call('RPUSH', wake, id)
        redis.call('EXPIRE', wake, ttl)
      end
    end
  end
end

local function save()
  redis.call('HSET', KEYS[1], 'value', value)
  for i = 1, 5 do
    redis.call('EXPIRE', KEYS[i], ttl)
  end
end
