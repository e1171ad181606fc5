-- Creates a container of a manager that is running, and records it in the manager's meta.
-- KEYS[1] the container's head hash, KEYS[2 .. #KEYS-1] its other keys, KEYS[#KEYS] the
-- manager's meta hash.
-- ARGV[1] now (ms), ARGV[2] TTL (s), ARGV[3] the container's meta field ('c:<kind>:<id>'),
-- ARGV[4] the kind, ARGV[5..] more head fields and values (the list's shape counter).
-- A dict's order (KEYS[2], a sorted set) starts with the member '\0' scored -inf, which keeps it
-- (and its TTL) existing while the dict is empty.
-- Errors: GONE (no manager: never created, shut down, or expired), SHUTDOWN (being shut down).
local meta = KEYS[#KEYS]
local state = redis.call('HGET', meta, 'state')
if not state then
  return redis.error_reply('GONE the manager does not exist')
end
if state ~= 'running' then
  return redis.error_reply('SHUTDOWN the manager is shutting down')
end
redis.call('HSET', meta, ARGV[3], '1')
redis.call('EXPIRE', meta, ARGV[2])
redis.call('HSET', KEYS[1], '\0v', 0, '\0r', ARGV[1], unpack(ARGV, 5))
redis.call('EXPIRE', KEYS[1], ARGV[2])
if ARGV[4] == 'dict' then
  redis.call('ZADD', KEYS[2], '-inf', '\0')
  redis.call('EXPIRE', KEYS[2], ARGV[2])
end
return 1
