-- The process exits normally (its exit hooks run): its holds stop depending on its heartbeat.
-- Each grant it still holds loses its lease (expiry 0), so it stays held until someone releases
-- it, as a Python lock held by an exited process does; only a holder that dies without exiting
-- (SIGKILL, a lost host) loses its hold when the lease lapses.
-- ARGV[5] holder prefix (the process), ARGV[6...] grant ids.
-- Returns the ids that now have no lease; the others were no longer held by this process.
reclaim()
local detached = {}
for i = 6, #ARGV do
  local record = redis.call('HGET', KEYS[2], ARGV[i])
  if record then
    local owner, expiry, count = parse_grant(record)
    if string.sub(owner, 1, #ARGV[5]) == ARGV[5] and expiry ~= nil then
      redis.call('HSET', KEYS[2], ARGV[i], owner .. '|0|' .. count)
      table.insert(detached, ARGV[i])
    end
  end
end
-- Nothing renews these keys any more: their TTL starts from now.
for i = 1, 5 do
  redis.call('EXPIRE', KEYS[i], ttl)
end
save()
return detached
