-- Creates a container of a manager that is running, and records it in the manager's meta.
-- KEYS[1] the container's head hash, KEYS[2] the manager's meta hash.
-- ARGV[1] now (ms), ARGV[2] TTL (s), ARGV[3] the container's meta field ('c:<kind>:<id>'),
-- ARGV[4..] more head fields and values (the list's shape counter).
-- Errors: GONE (no manager: never created, shut down, or expired), SHUTDOWN (being shut down).
local state = redis.call('HGET', KEYS[2], 'state')
if not state then
  return redis.error_reply('GONE the manager does not exist')
end
if state ~= 'running' then
  return redis.error_reply('SHUTDOWN the manager is shutting down')
end
redis.call('HSET', KEYS[2], ARGV[3], '1')
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('HSET', KEYS[1], '\0v', 0, '\0r', ARGV[1], unpack(ARGV, 4))
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
