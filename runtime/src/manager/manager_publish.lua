-- Manager.publish: puts a value under a name in a running manager's record.
-- KEYS[1] the meta hash. ARGV[1] the field ('o:<name>'), ARGV[2] the encoded value.
-- Errors: GONE (no such manager), SHUTDOWN (it was shut down).
local state = redis.call('HGET', KEYS[1], 'state')
if not state then
  return redis.error_reply('GONE the manager does not exist')
end
if state ~= 'running' then
  return redis.error_reply('SHUTDOWN the manager was shut down')
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
