-- Manager.publish: puts a value under a name in a running manager's record.
-- KEYS[1] the meta hash. ARGV[1] the field ('o:<name>'), ARGV[2] the encoded value, ARGV[3] the
-- TTL (s): the record's TTL is refreshed (every use of a manager keeps it alive).
-- Errors: GONE (no such manager), SHUTDOWN (it was shut down).
local state = redis.call('HGET', KEYS[1], 'state')
if not state then
  return redis.error_reply('GONE the manager does not exist')
end
if state ~= 'running' then
  return redis.error_reply('SHUTDOWN the manager was shut down')
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
