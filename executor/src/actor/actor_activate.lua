-- A host takes an actor: a new lease with a fencing token, and the state to start from.
-- KEYS[1] state hash, KEYS[2] lease, KEYS[3] fencing counter, KEYS[4] activation marker,
-- KEYS[5] mailbox stream
-- ARGV[1] host id, ARGV[2] lease ms, ARGV[3] TTL seconds (the state, the mailbox and the
-- fencing counter get it back: the host's renewals keep them alive from here on)
-- Returns {token, type, data, applied, auth, status, failures, verifier, reason}, or {0} when
-- another host holds the lease. Errors: NOACTOR.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return redis.error_reply('NOACTOR no actor at ' .. KEYS[1])
end
local holder = redis.call('GET', KEYS[2])
if holder and string.sub(holder, 1, string.len(ARGV[1]) + 1) ~= ARGV[1] .. ':' then
  return {0}
end
local token = redis.call('INCR', KEYS[3])
redis.call('EXPIRE', KEYS[3], ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[5], ARGV[3])
redis.call('SET', KEYS[2], ARGV[1] .. ':' .. token, 'PX', ARGV[2])
redis.call('DEL', KEYS[4])
local s = redis.call('HMGET', KEYS[1], 'type', 'data', 'applied', 'auth', 'status', 'failures',
  'verifier', 'reason')
return {token, s[1], s[2], s[3], s[4], s[5], s[6], s[7], s[8]}
