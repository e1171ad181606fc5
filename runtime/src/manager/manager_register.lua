-- Manager.register: records a type under a type id in a running manager's record, unless the
-- id is taken, and refreshes the record's TTL; the check and the write are one script, so a
-- shutdown cannot come between them (a write after the record was deleted would make it again,
-- with no TTL).
-- KEYS[1] the meta hash. ARGV[1] the field ('t:<typeid>'), ARGV[2] the type's name, ARGV[3] the
-- TTL (s).
-- Returns the type's name now under the id: ARGV[2], or the other type that took the id.
-- Errors: GONE (no such manager), SHUTDOWN (it was shut down).
local state = redis.call('HGET', KEYS[1], 'state')
if not state then
  return redis.error_reply('GONE the manager does not exist')
end
if state ~= 'running' then
  return redis.error_reply('SHUTDOWN the manager was shut down')
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  return ARGV[2]
end
return redis.call('HGET', KEYS[1], ARGV[1])
