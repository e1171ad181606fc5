-- An asker waiting for a reply checks that some host has the actor.
-- KEYS[1] state hash, KEYS[2] lease, KEYS[3] activation marker
-- ARGV[1] how long (ms) an activation request holds
-- Returns 1 when the caller must ask for an activation, else 0. Errors: NOACTOR.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return redis.error_reply('NOACTOR no actor at ' .. KEYS[1])
end
if redis.call('EXISTS', KEYS[2]) == 0 and
   redis.call('SET', KEYS[3], '1', 'NX', 'PX', ARGV[1]) then
  return 1
end
return 0
