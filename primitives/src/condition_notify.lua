-- Condition.notify(n) / notify_all: wakes up to ARGV[7] live waiters (-1: all), in order, and
-- the waiters before them that missed their check-ins (not counted). The caller must hold the
-- lock.
-- KEYS[1..5] the lock (see the prelude), KEYS[6] condition waiters, KEYS[7] condition waiting
-- ARGV[5] holder, ARGV[6] the caller's grant id, ARGV[7] how many, ARGV[8] condition wake prefix
-- Returns how many were woken.
local holder, mine, want = ARGV[5], ARGV[6], tonumber(ARGV[7])
reclaim()
local record = redis.call('HGET', KEYS[2], mine)
local owner
if record then
  owner = parse_grant(record)
end
if not record or owner ~= holder then
  save()
  return redis.error_reply('NOTOWNER cannot notify on an un-acquired lock')
end
-- Liveness deadlines are on Redis's clock (condition_wait.lua, waiters.lua).
local clock = redis.call('TIME')
local clock_now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local woken = 0
while want < 0 or woken < want do
  local waiter = redis.call('LPOP', KEYS[6])
  if not waiter then
    break
  end
  local deadline = tonumber(redis.call('HGET', KEYS[7], waiter))
  redis.call('HDEL', KEYS[7], waiter)
  -- A waiter that missed its check-ins is woken too, without counting: it may be alive (stopped
  -- or slow for a while), and it would otherwise queue itself again at its next check-in while
  -- the notification went to nobody. Alive, it has a spurious wake-up (wait_for absorbs it);
  -- dead, its wake key expires.
  local wake = ARGV[8] .. waiter
  redis.call('RPUSH', wake, 1)
  redis.call('EXPIRE', wake, ttl)
  if deadline and deadline >= clock_now then
    woken = woken + 1
  end
end
save()
return woken
