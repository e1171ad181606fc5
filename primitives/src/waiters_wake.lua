-- Wakes up to ARGV[4] live waiters (-1: all), in order, and the waiters before them whose
-- liveness deadline passed (on Redis's clock, TIME), without counting those: they may be alive
-- (stopped or slow for a while), and would otherwise queue themselves again at their next
-- check-in while the wake-up went to nobody. Alive, such a waiter has a spurious wake-up (a
-- condition's wait_for, a writer's next put absorb it); dead, its wake key expires.
-- Returns how many live waiters were woken.
-- KEYS[1] waiters list, KEYS[2] waiting hash
-- ARGV[1] the caller's now (ms; unused: liveness is judged on Redis's clock), ARGV[2] TTL (s),
-- ARGV[3] wake key prefix, ARGV[4] how many
local want = tonumber(ARGV[4])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local woken = 0
while want < 0 or woken < want do
  local waiter = redis.call('LPOP', KEYS[1])
  if not waiter then
    break
  end
  local deadline = tonumber(redis.call('HGET', KEYS[2], waiter))
  redis.call('HDEL', KEYS[2], waiter)
  local wake = ARGV[3] .. waiter
  redis.call('RPUSH', wake, 1)
  redis.call('EXPIRE', wake, ARGV[2])
  if deadline and deadline >= now then
    woken = woken + 1
  end
end
return woken
