-- Barrier.wait, first step: arrive. The caller's BLPOP on its own wake key is written right
-- behind this call (one round trip): every outcome but "wait" is also pushed to that key, so the
-- BLPOP returns at once; a caller that waits is woken by the last arrival's push.
-- KEYS[1] state hash (parties, count, generation, broken, acting, suspect, released: see
-- barrier.rs), KEYS[2] waiters list, KEYS[3] the callers entering while the last arrival runs
-- the action
-- ARGV[1] TTL, ARGV[2] wake key prefix, ARGV[3] waiter id, ARGV[4] '1' when there is an action,
-- ARGV[5] the lease (ms): the runner of the action holds one from now (Redis's clock), which
-- its heartbeat renews while the action runs
-- Returns {code, arrival index, generation}: code 0 broken, 1 wait, 2 passed (this caller was the
-- last and released the others), 3 run the action then release (this caller was the last), 4
-- wait for the generation whose action runs to end, then arrive again (woken with 'again',
-- Python's Barrier._enter); the caller's wake key gets 'broken', nothing, 'go', 'act', nothing
-- respectively.
local state = redis.call('HMGET', KEYS[1], 'parties', 'count', 'generation', 'broken')
local parties = tonumber(state[1])
local count = tonumber(state[2])
local generation = tonumber(state[3])
local broken = state[4]
if not (state[1] or state[2] or state[3] or broken) and redis.call('EXISTS', KEYS[1]) == 0 then
  return redis.error_reply('GONE the barrier does not exist')
end
if parties == nil or count == nil or generation == nil or broken == false then
  return redis.error_reply('CORRUPT the barrier state is not numbers')
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
local own = ARGV[2] .. ARGV[3]
local function answer(message)
  redis.call('RPUSH', own, message)
  redis.call('EXPIRE', own, ARGV[1])
end
if broken == '1' then
  answer('broken')
  return {0, 0, generation}
end
if count >= parties then
  redis.call('RPUSH', KEYS[3], ARGV[3])
  redis.call('EXPIRE', KEYS[3], ARGV[1])
  return {4, 0, generation}
end
local index = count
count = count + 1
if count < parties then
  redis.call('HSET', KEYS[1], 'count', count)
  redis.call('RPUSH', KEYS[2], ARGV[3])
  redis.call('EXPIRE', KEYS[2], ARGV[1])
  return {1, index, generation}
end
if ARGV[4] == '1' then
  local clock = redis.call('TIME')
  local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
  redis.call('HSET', KEYS[1], 'count', count, 'acting', now + tonumber(ARGV[5]), 'suspect', 0)
  answer('act')
  return {3, index, generation}
end
local waiters = redis.call('LRANGE', KEYS[2], 0, -1)
for _, waiter in ipairs(waiters) do
  local wake = ARGV[2] .. waiter
  redis.call('RPUSH', wake, 'go')
  redis.call('EXPIRE', wake, ARGV[1])
end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[1], 'count', 0, 'generation', generation + 1)
answer('go')
return {2, index, generation}
