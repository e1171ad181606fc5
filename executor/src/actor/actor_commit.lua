-- Commits a batch of messages: the state after them, the last one applied, the replies to the
-- asks among them, and their removal from the mailbox, in one step, and only while the lease
-- is still this host's (a host whose lease lapsed cannot overwrite its successor's state).
-- KEYS[1] state hash, KEYS[2] mailbox stream, KEYS[3] lease, KEYS[4] fencing counter
-- ARGV[1] lease value (host:token), ARGV[2] state, ARGV[3] last applied entry id,
-- ARGV[4] status, ARGV[5] reason, ARGV[6] failures, ARGV[7] TTL seconds,
-- ARGV[8] reply TTL ms, ARGV[9] the first entry id after ARGV[3] (the trim's MINID),
-- ARGV[10] the host-death fields to remove (see actor_activate.lua): '' none, 'running' the
-- mark of the message being run, 'deaths' that mark and the count of deaths (the batch applies
-- the entry counted), then (reply key, reply) pairs, one per ask of the batch
-- The host computes ARGV[9] and sends replies only for asks: the script does no string or
-- number work of its own, which costs more in Lua than the commands it runs.
-- Returns 1. Errors: STALE (the lease is not this host's).
if redis.call('GET', KEYS[3]) ~= ARGV[1] then
  return redis.error_reply('STALE the activation lease was lost')
end
redis.call('HSET', KEYS[1], 'data', ARGV[2], 'applied', ARGV[3], 'status', ARGV[4],
  'reason', ARGV[5], 'failures', ARGV[6], 'handbacks', 0)
if ARGV[10] == 'running' then
  redis.call('HDEL', KEYS[1], 'running')
elseif ARGV[10] == 'deaths' then
  redis.call('HDEL', KEYS[1], 'running', 'deaths_entry', 'deaths')
end
for i = 11, #ARGV, 2 do
  redis.call('RPUSH', ARGV[i], ARGV[i + 1])
  redis.call('PEXPIRE', ARGV[i], ARGV[8])
end
-- Every entry up to the last applied one is applied: one XTRIM removes them (the batch and
-- anything left before it), where an XDEL per entry would walk the stream once per entry.
redis.call('XTRIM', KEYS[2], 'MINID', ARGV[9])
redis.call('EXPIRE', KEYS[1], ARGV[7])
redis.call('EXPIRE', KEYS[2], ARGV[7])
redis.call('EXPIRE', KEYS[4], ARGV[7])
return 1
