-- A waiting get's check-in (once per second of waiting): the queue still exists, the claims of
-- holders whose hold lapsed go back to the queue (which wakes the waiter), and the TTLs are
-- refreshed. ARGV[1] TTL, ARGV[2] claim prefix.
-- Returns 1. Errors: GONE (the queue's keys are gone).
if redis.call('EXISTS', KEYS[2]) == 0 then
  return redis.error_reply('GONE the queue does not exist')
end
reap(ARGV[2], now_ms(), '')
redis.call('EXPIRE', KEYS[2], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[1])
refresh_claims(KEYS[3], ARGV[2], ARGV[1])
return 1
