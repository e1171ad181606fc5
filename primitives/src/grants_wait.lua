-- A queued waiter checks in: after a wait slice ('refresh') or when it gives up ('cancel').
-- ARGV[5] holder, ARGV[6] waiter id, ARGV[7] refresh | cancel, ARGV[8] new liveness deadline.
-- Returns {1, grant id} when a grant was pushed to the waiter (it owns it, even when it was about
-- to give up), {0} otherwise. 'refresh' also reclaims lapsed grants, which may grant this one.
local holder, waiter, mode = ARGV[5], ARGV[6], ARGV[7]
local wake = wake_prefix .. waiter
local got = redis.call('LPOP', wake)
if got then
  redis.call('DEL', wake)
  return {1, tonumber(got)}
end
if mode == 'cancel' then
  unqueue_waiter(waiter)
  save()
  return {0}
end
if redis.call('HEXISTS', KEYS[4], waiter) == 0 then
  -- Skipped as dead after a slow slice: queue again.
  queue_waiter(waiter, ARGV[8] .. '|' .. holder)
else
  redis.call('HSET', KEYS[4], waiter, ARGV[8] .. '|' .. holder)
end
reclaim()
grant_waiters()
save()
got = redis.call('LPOP', wake)
if got then
  redis.call('DEL', wake)
  return {1, tonumber(got)}
end
return {0}
