-- Wakes up to ARGV[4] live waiters (-1: all), in order; returns how many.
-- KEYS[1] waiters list, KEYS[2] waiting hash
-- ARGV[1] now (ms), ARGV[2] TTL (s), ARGV[3] wake key prefix, ARGV[4] how many
local now, want = tonumber(ARGV[1]), tonumber(ARGV[4])
local woken = 0
while want < 0 or woken < want do
  local waiter = redis.call('LPOP', KEYS[1])
  if not waiter then
    break
  end
  local deadline = tonumber(redis.call('HGET', KEYS[2], waiter))
  redis.call('HDEL', KEYS[2], waiter)
  if deadline and deadline >= now then
    local wake = ARGV[3] .. waiter
    redis.call('RPUSH', wake, 1)
    redis.call('EXPIRE', wake, ARGV[2])
    woken = woken + 1
  end
end
return woken
