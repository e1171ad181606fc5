-- Puts a message in an actor's mailbox: durable once this returns.
-- KEYS[1] state hash, KEYS[2] mailbox stream, KEYS[3] lease, KEYS[4] activation marker
-- ARGV[1] kind, ARGV[2] payload, ARGV[3] reply key ('' for a tell), ARGV[4] MAC ('' if none),
-- ARGV[5] TTL seconds, ARGV[6] how long (ms) an activation request holds before another is made,
-- ARGV[7] the sender's verifier for this actor ('' if it does not sign)
-- Returns 1 when no host has the actor and none was asked yet (the caller asks for one), else 0.
-- Errors: NOACTOR (no such actor, or it expired), FAILED <reason>, STOPPED, AUTH (a signed
-- actor, and the sender's key is not the one it was created under: nothing is written).
local s = redis.call('HMGET', KEYS[1], 'status', 'verifier')
local status = s[1]
if not status then
  return redis.error_reply('NOACTOR no actor at ' .. KEYS[1])
end
if status == 'failed' then
  return redis.error_reply('FAILED ' .. (redis.call('HGET', KEYS[1], 'reason') or ''))
end
if status == 'stopped' then
  return redis.error_reply('STOPPED the actor was stopped')
end
if (s[2] or '') ~= '' and s[2] ~= ARGV[7] then
  return redis.error_reply('AUTH the sender does not hold the authkey the actor was created under')
end
local fields = {'k', ARGV[1], 'p', ARGV[2]}
if ARGV[3] ~= '' then
  table.insert(fields, 'r')
  table.insert(fields, ARGV[3])
end
if ARGV[4] ~= '' then
  table.insert(fields, 'h')
  table.insert(fields, ARGV[4])
end
redis.call('XADD', KEYS[2], '*', unpack(fields))
redis.call('EXPIRE', KEYS[2], ARGV[5])
if redis.call('EXISTS', KEYS[3]) == 0 and
   redis.call('SET', KEYS[4], '1', 'NX', 'PX', ARGV[6]) then
  return 1
end
return 0
