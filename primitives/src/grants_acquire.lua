-- Acquire: take a permit now, or queue as a waiter.
-- ARGV[5] holder, ARGV[6] kind (lock | rlock | semaphore | bounded), ARGV[7] waiter id ('' to
-- not wait), ARGV[8] the waiter's liveness deadline (ms), ARGV[9] (rlock) the grant the holder
-- holds as its process counts it ('' when none).
-- An RLock is re-entered only through the grant ARGV[9] names: a grant of the holder that its
-- process no longer counts is one whose last level it released (the release may still be on
-- its way, may be sent again, or never arrive and lapse). Re-entering that grant would add a
-- level that the late release, or its repeat, takes off again: the lock would be free in Redis
-- while its owner believes it holds it. Instead the holder waits for that grant to go, like any
-- other caller (the release hands the permit on at once; a lapse, after the lease).
-- Returns {1, grant id, recursion count} when acquired, {0} otherwise.
local holder, kind, waiter, mine = ARGV[5], ARGV[6], ARGV[7], ARGV[9]
reclaim()
if kind == 'rlock' and mine ~= nil and mine ~= '' then
  local record = redis.call('HGET', KEYS[2], mine)
  if record then
    local owner, expiry, count = parse_grant(record)
    if owner == holder and count ~= nil then
      redis.call('HSET', KEYS[2], mine, owner .. '|' .. (now + lease) .. '|' .. (count + 1))
      note_expiry(now + lease)
      save()
      return {1, tonumber(mine), count + 1}
    end
  end
end
grant_waiters()
if value > 0 then
  value = value - 1
  dirty = true
  local id = new_grant(holder)
  save()
  return {1, id, 1}
end
if waiter ~= '' then
  queue_waiter(waiter, ARGV[8] .. '|' .. holder)
end
save()
return {0}
