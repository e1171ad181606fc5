-- Acquire: take a permit now, or queue as a waiter.
-- ARGV[5] holder, ARGV[6] kind (lock | rlock | semaphore | bounded), ARGV[7] waiter id ('' to
-- not wait), ARGV[8] the waiter's liveness deadline (ms).
-- Returns {1, grant id, recursion count} when acquired, {0} otherwise.
local holder, kind, waiter = ARGV[5], ARGV[6], ARGV[7]
reclaim()
if kind == 'rlock' then
  local all = redis.call('HGETALL', KEYS[2])
  for i = 1, #all, 2 do
    local owner, expiry, count = parse_grant(all[i + 1])
    if all[i] ~= '_' and owner == holder then
      redis.call('HSET', KEYS[2], all[i], owner .. '|' .. (now + lease) .. '|' .. (count + 1))
      note_expiry(now + lease)
      save()
      return {1, tonumber(all[i]), count + 1}
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
