-- First step of Manager.shutdown: no container may be created from now on; returns the meta's
-- field names (the caller derives every container's keys from the 'c:<kind>:<id>' ones and
-- deletes them with the meta), or an empty array when the manager is already gone.
-- KEYS[1] the meta hash.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {}
end
redis.call('HSET', KEYS[1], 'state', 'shutdown')
return redis.call('HKEYS', KEYS[1])
