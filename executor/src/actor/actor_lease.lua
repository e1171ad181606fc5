-- Renews or gives up an activation lease, only if it is still the caller's.
-- KEYS[1] lease, KEYS[2] activation marker, then (renew and release) KEYS[3] mailbox stream,
-- and KEYS[4] state hash, KEYS[5] fencing counter (when ARGV[5] is given)
-- ARGV[1] 'renew' or 'release', ARGV[2] lease value (host:token), ARGV[3] lease ms,
-- ARGV[4] (release) the last mailbox entry applied ('' if none; unused by a renewal),
-- ARGV[5] TTL seconds: the actor's keys (KEYS[3] on) get it back, if the lease is the caller's
-- ('' or absent: left alone)
-- ARGV[1] 'orphan': ARGV[2] a host id; its lease is removed whatever its token (the host is
-- known to be dead), with the activation marker, so another host can take the actor at once.
-- A release also removes the applied entries from the mailbox (the commits trim it by whole
-- stream nodes), and looks at what is left at the instant the lease goes: a message sent
-- while the lease stood (its sender saw a host, so asked for none) and not read by the
-- releasing host would wait for the next sender. It returns 2 then, when no activation
-- request stands (the marker is set here): the caller asks for a host.
-- A release whose lease is nobody's any more (it lapsed: a host paused or cut off past its
-- lease, or one whose actor thread ended on an error) does the same when the mailbox holds
-- entries: a message sent while senders still saw the lease would otherwise wait for the next
-- sender (entries applied already may be among them: the host that comes only removes those).
-- A release of the caller's lease also removes the host-death marks `held` and `running` from
-- the state (see actor_activate.lua): the host is alive, and gave the actor back in order. A
-- removal of a dead host's lease ('orphan') leaves them: its death is for the next activation
-- to see.
-- Returns 1 when the lease was this caller's (or the dead host's), 2 as above, else 0.
local holder = redis.call('GET', KEYS[1])
if ARGV[1] == 'orphan' then
  if holder and string.sub(holder, 1, string.len(ARGV[2]) + 1) == ARGV[2] .. ':' then
    redis.call('DEL', KEYS[1], KEYS[2])
    return 1
  end
  return 0
end
if holder ~= ARGV[2] then
  if ARGV[1] == 'release' and not holder and KEYS[3] and
     redis.call('XLEN', KEYS[3]) > 0 and
     redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[3]) then
    return 2
  end
  return 0
end
-- The host that holds the actor keeps its keys alive, however long it goes without a commit.
if ARGV[5] and ARGV[5] ~= '' then
  for i = 3, #KEYS do
    redis.call('EXPIRE', KEYS[i], ARGV[5])
  end
end
if ARGV[1] == 'renew' then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return 1
end
redis.call('DEL', KEYS[1])
-- Released by a live host: whatever it was running did not kill it (see actor_activate.lua).
if KEYS[4] then
  redis.call('HDEL', KEYS[4], 'held', 'running')
end
if KEYS[3] then
  if ARGV[4] and ARGV[4] ~= '' then
    redis.call('XTRIM', KEYS[3], 'MINID', ARGV[4])
    redis.call('XDEL', KEYS[3], ARGV[4])
  end
  if redis.call('XLEN', KEYS[3]) > 0 and
     redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[3]) then
    return 2
  end
end
return 1
