-- Condition.wait, first step: queue the caller as a waiter of the condition and release its
-- hold of the lock, in one step, so that no notify can fall between the two.
-- KEYS[1..5] the lock (see the prelude), KEYS[6] condition waiters, KEYS[7] condition waiting
-- ARGV[5] holder, ARGV[6] the caller's grant id, ARGV[7] waiter id, ARGV[8] how long the waiter
-- counts as alive without checking in (ms): its liveness deadline is that long from now on
-- Redis's clock
-- Returns the recursion count the caller held, to restore when it takes the lock back.
local holder, mine, waiter = ARGV[5], ARGV[6], ARGV[7]
reclaim()
local record = redis.call('HGET', KEYS[2], mine)
local owner, expiry, count
if record then
  owner, expiry, count = parse_grant(record)
end
if not record or owner ~= holder then
  save()
  return redis.error_reply('NOTOWNER cannot wait on an un-acquired lock')
end
local clock = redis.call('TIME')
local clock_now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
redis.call('RPUSH', KEYS[6], waiter)
redis.call('HSET', KEYS[7], waiter, clock_now + tonumber(ARGV[8]))
redis.call('EXPIRE', KEYS[6], ttl)
redis.call('EXPIRE', KEYS[7], ttl)
-- The waiter leaves the lock: the state changes.
dirty = true
redis.call('HDEL', KEYS[2], mine)
add_permits(1)
grant_waiters()
save()
return count
