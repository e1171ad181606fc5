-- Renews or gives up an activation lease, only if it is still the caller's.
-- KEYS[1] lease, KEYS[2] activation marker
-- ARGV[1] 'renew' or 'release', ARGV[2] lease value (host:token), ARGV[3] lease ms
-- ARGV[1] 'orphan': ARGV[2] a host id; its lease is removed whatever its token (the host is
-- known to be dead), with the activation marker, so another host can take the actor at once.
-- Returns 1 when the lease was this caller's (or the dead host's), else 0.
local holder = redis.call('GET', KEYS[1])
if ARGV[1] == 'orphan' then
  if holder and string.sub(holder, 1, string.len(ARGV[2]) + 1) == ARGV[2] .. ':' then
    redis.call('DEL', KEYS[1], KEYS[2])
    return 1
  end
  return 0
end
if holder ~= ARGV[2] then
  return 0
end
if ARGV[1] == 'renew' then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
else
  redis.call('DEL', KEYS[1])
end
return 1
