-- Commits a batch of messages: the state after them, the last one applied, the replies to the
-- asks among them, and their removal from the mailbox, in one step, and only while the lease
-- is still this host's (a host whose lease lapsed cannot overwrite its successor's state).
-- KEYS[1] state hash, KEYS[2] mailbox stream, KEYS[3] lease
-- ARGV[1] lease value (host:token), ARGV[2] state, ARGV[3] last applied entry id,
-- ARGV[4] status, ARGV[5] reason, ARGV[6] failures, ARGV[7] TTL seconds,
-- ARGV[8] reply TTL ms, then (entry id, reply key or '', reply) triplets
-- Returns the number of entries committed. Errors: STALE (the lease is not this host's).
if redis.call('GET', KEYS[3]) ~= ARGV[1] then
  return redis.error_reply('STALE the activation lease was lost')
end
redis.call('HSET', KEYS[1], 'data', ARGV[2], 'applied', ARGV[3], 'status', ARGV[4],
  'reason', ARGV[5], 'failures', ARGV[6], 'handbacks', 0)
local n = 0
for i = 9, #ARGV, 3 do
  if ARGV[i + 1] ~= '' then
    redis.call('RPUSH', ARGV[i + 1], ARGV[i + 2])
    redis.call('PEXPIRE', ARGV[i + 1], ARGV[8])
  end
  n = n + 1
end
-- Every entry up to the last applied one is applied: one XTRIM removes them (the batch and
-- anything left before it), where an XDEL per entry would walk the stream once per entry.
local dash = string.find(ARGV[3], '-', 1, true)
local seq = dash and tonumber(string.sub(ARGV[3], dash + 1))
if seq then
  redis.call('XTRIM', KEYS[2], 'MINID',
    string.sub(ARGV[3], 1, dash - 1) .. '-' .. string.format('%d', seq + 1))
end
redis.call('EXPIRE', KEYS[1], ARGV[7])
redis.call('EXPIRE', KEYS[2], ARGV[7])
return n
