-- Creates a manager's meta hash.
-- KEYS[1] the meta hash. ARGV[1] TTL (s), ARGV[2] nonce, ARGV[3] verifier (HMAC-SHA256 of the
-- nonce under the manager's authkey).
-- Meta fields: state ('running', then 'shutdown'), nonce, verifier, 't:<typeid>' per registered
-- type, 'a:<actor id>' per instance of one, 'o:<name>' per published value (containers are in
-- the manager's index, see container_create.lua). Error: EXISTS (an id was reused: never
-- overwrite a manager).
if redis.call('EXISTS', KEYS[1]) == 1 then
  return redis.error_reply('EXISTS a manager with this id exists')
end
redis.call('HSET', KEYS[1], 'state', 'running', 'nonce', ARGV[2], 'verifier', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
