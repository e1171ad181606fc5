-- Creates a container of a manager that is running, and records it in the manager's index
-- (after container_prelude.lua: KEYS and ARGV[1], ARGV[2] as there).
-- KEYS[1] the container's head hash, KEYS[2 .. #KEYS-2] its other keys, KEYS[#KEYS-1] the
-- manager's container index, KEYS[#KEYS] the manager's meta hash.
-- ARGV[3] the kind, ARGV[4..] more head fields and values (the list's shape counter).
-- A dict's order (KEYS[2], a sorted set) starts with the member '\0' scored -inf, which keeps it
-- (and its TTL) existing while the dict is empty.
-- The index only grows by creations, so a creation also prunes it: an entry whose score (the
-- last refresh of its container's TTLs) is more than twice the TTL old is a container whose keys
-- expired (one TTL), whatever the clocks of the callers that refreshed it (the other TTL is the
-- margin for clocks that disagree); shutdown deletes the containers the index lists.
-- Errors: GONE (no manager: never created, shut down, or expired), SHUTDOWN (being shut down).
local index = KEYS[#KEYS - 1]
local meta = KEYS[#KEYS]
local state = redis.call('HGET', meta, 'state')
if not state then
  return redis.error_reply('GONE the manager does not exist')
end
if state ~= 'running' then
  return redis.error_reply('SHUTDOWN the manager is shutting down')
end
redis.call('ZREMRANGEBYSCORE', index, '-inf', '(' .. (now - 2 * ttl * 1000))
redis.call('HSET', KEYS[1], '\0v', 0, unpack(ARGV, 4))
if ARGV[3] == 'dict' then
  redis.call('ZADD', KEYS[2], '-inf', '\0')
end
-- The index's entry, every key's TTL and the head's '\0r'.
refresh()
return 1
