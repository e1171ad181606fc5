-- A host gives back an activation it cannot serve (the actor's type is not in its program, or
-- the actor was created under another authkey): the lease goes, and the give-back is counted.
-- Past the limit, with no host of the actor's own program serving it in between (a commit
-- resets the count), the actor is failed with the host's reason: its senders get that error
-- rather than waiting for a host that never comes.
-- KEYS[1] state hash, KEYS[2] lease
-- ARGV[1] lease value (host:token), ARGV[2] the limit, ARGV[3] the reason
-- Returns 'again' (ask for another host), 'failed' (the limit was reached) or 'lost' (the lease
-- was not the caller's any more).
if redis.call('GET', KEYS[2]) ~= ARGV[1] then
  return 'lost'
end
redis.call('DEL', KEYS[2])
local n = redis.call('HINCRBY', KEYS[1], 'handbacks', 1)
if n >= tonumber(ARGV[2]) and redis.call('HGET', KEYS[1], 'status') == 'active' then
  redis.call('HSET', KEYS[1], 'status', 'failed', 'reason', ARGV[3])
  return 'failed'
end
return 'again'
