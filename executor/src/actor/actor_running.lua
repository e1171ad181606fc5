-- Marks the message a host is about to run while it serves an actor in suspect mode (its
-- previous holder went without releasing it: see actor_activate.lua), only while the lease is
-- still this host's: the next activation counts a death of that message if it finds the mark
-- with the message not applied. The commit of the message removes the mark.
-- KEYS[1] state hash, KEYS[2] lease
-- ARGV[1] lease value (host:token), ARGV[2] the message's entry id
-- Returns 1. Errors: STALE (the lease is not this host's).
if redis.call('GET', KEYS[2]) ~= ARGV[1] then
  return redis.error_reply('STALE the activation lease was lost')
end
redis.call('HSET', KEYS[1], 'running', ARGV[2])
return 1
