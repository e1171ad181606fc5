-- A waiter of an Event or a Condition checks in.
-- KEYS[1] waiters list, KEYS[2] waiting hash (waiter -> liveness deadline ms), KEYS[3..] the
-- keys of the object waited on: a wait is a use of it, so they live as long as it lasts (an
-- expired one stays expired, and the caller's recheck reports it gone)
-- ARGV[1] now (ms), ARGV[2] TTL (s), ARGV[3] wake key prefix, ARGV[4] waiter id,
-- ARGV[5] begin | refresh | cancel, ARGV[6] new liveness deadline (ms)
-- 'begin' queues the waiter. 'refresh' keeps it queued (queues it again if it was dropped as
-- dead). 'cancel' removes it. Returns 1 when a wake-up reached the waiter (it was notified or the
-- event was set), 0 otherwise.
local waiter, mode = ARGV[4], ARGV[5]
local wake = ARGV[3] .. waiter
if mode ~= 'begin' then
  local woken = redis.call('LPOP', wake)
  if woken then
    redis.call('DEL', wake)
    return 1
  end
end
if mode == 'cancel' then
  redis.call('LREM', KEYS[1], 0, waiter)
  redis.call('HDEL', KEYS[2], waiter)
  return 0
end
if mode == 'begin' or redis.call('HEXISTS', KEYS[2], waiter) == 0 then
  redis.call('RPUSH', KEYS[1], waiter)
end
redis.call('HSET', KEYS[2], waiter, ARGV[6])
for i = 1, #KEYS do
  redis.call('EXPIRE', KEYS[i], ARGV[2])
end
return 0
