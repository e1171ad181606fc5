-- Renew the leases of grants a process holds (its heartbeat), and refresh the TTLs.
-- ARGV[5] holder prefix (the process), ARGV[6...] grant ids.
-- Returns the ids that are no longer held by this process (their lease lapsed, or another
-- process released them).
local lost = {}
for i = 6, #ARGV do
  local record = redis.call('HGET', KEYS[2], ARGV[i])
  local owner, expiry, count
  if record then
    owner, expiry, count = parse_grant(record)
  end
  if record and string.sub(owner, 1, #ARGV[5]) == ARGV[5] and expiry >= now then
    redis.call('HSET', KEYS[2], ARGV[i], owner .. '|' .. (now + lease) .. '|' .. count)
    note_expiry(now + lease)
  else
    table.insert(lost, ARGV[i])
  end
end
reclaim()
grant_waiters()
-- The heartbeat of a holder keeps the object alive however long it is held.
for i = 1, 5 do
  redis.call('EXPIRE', KEYS[i], ttl)
end
save()
return lost
