-- Condition.notify(n) / notify_all: wakes up to ARGV[7] live waiters (-1: all), in order. The
-- caller must hold the lock.
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
local woken = 0
while want < 0 or woken < want do
  local waiter = redis.call('LPOP', KEYS[6])
  if not waiter then
    break
  end
  local deadline = tonumber(redis.call('HGET', KEYS[7], waiter))
  redis.call('HDEL', KEYS[7], waiter)
  if deadline and deadline >= now then
    local wake = ARGV[8] .. waiter
    redis.call('RPUSH', wake, 1)
    redis.call('EXPIRE', wake, ttl)
    woken = woken + 1
  end
end
save()
return woken
