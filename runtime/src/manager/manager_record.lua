-- Puts a field in a running manager's record and refreshes the record's TTL (every use of a
-- manager keeps it alive): Manager.publish (a value under a name), Manager.create (an instance
-- of a registered type, which the shutdown stops) and Manager.register (a type under a type id,
-- unless the id is taken). The check and the write are one script, so a shutdown cannot come
-- between them (a write after the record was deleted would make it again, with no TTL, and an
-- instance recorded there would never be stopped).
-- KEYS[1] the meta hash. ARGV[1] the field ('o:<name>', 'a:<actor id>', 't:<typeid>'), ARGV[2]
-- its value (the encoded value; '<namespace>|<typeid>', see registered.rs; the type's name),
-- ARGV[3] the TTL (s), ARGV[4] 'nx' to keep a value already there (register).
-- Returns 1; with 'nx', the value now under the field: ARGV[2], or the one that was there.
-- Errors: GONE (no such manager), SHUTDOWN (it was shut down).
local state = redis.call('HGET', KEYS[1], 'state')
if not state then
  return redis.error_reply('GONE the manager does not exist')
end
if state ~= 'running' then
  return redis.error_reply('SHUTDOWN the manager was shut down')
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
if ARGV[4] == 'nx' then
  if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then
    return ARGV[2]
  end
  return redis.call('HGET', KEYS[1], ARGV[1])
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
