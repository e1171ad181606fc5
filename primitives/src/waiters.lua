-- A waiter of an Event or a Condition (or a queue's writer or joiner) checks in.
-- KEYS[1] waiters list, KEYS[2] waiting hash (waiter -> liveness deadline ms), KEYS[3..] the
-- keys of the object waited on: a wait is a use of it, so they live as long as it lasts (an
-- expired one stays expired, and the caller's recheck reports it gone)
-- ARGV[1] the caller's now (ms), ARGV[2] TTL (s), ARGV[3] wake key prefix, ARGV[4] waiter id,
-- ARGV[5] begin | refresh | cancel, ARGV[6] the caller's new liveness deadline (ms, its clock):
-- the deadline recorded is as far from Redis's now (TIME) as ARGV[6] is from ARGV[1], so that
-- whoever wakes the waiters judges liveness on one clock, Redis's (waiters_wake.lua,
-- condition_notify.lua).
-- 'begin' queues the waiter. 'refresh' keeps it queued (queues it again if it was dropped as
-- dead: a waker that drops a waiter pushes it a wake-up too, found first). 'cancel' removes it.
-- Returns 1 when a wake-up reached the waiter (it was notified or the event was set), 0
-- otherwise.
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
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local span = math.max((tonumber(ARGV[6]) or 0) - (tonumber(ARGV[1]) or 0), 0)
redis.call('HSET', KEYS[2], waiter, now + span)
for i = 1, #KEYS do
  redis.call('EXPIRE', KEYS[i], ARGV[2])
end
return 0
