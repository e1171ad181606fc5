-- dict[key] = value. A new key is appended to the insertion order, scored by the new version.
-- KEYS as dict_get.lua. ARGV[3] the encoded key, ARGV[4] the encoded value.
-- The version ('\0v') counts the insertions and deletions of keys (an iterator compares it);
-- replacing a value does not change it. Returns 1 when the key is new, 0 when it was replaced.
local h, err = open()
if not h then
  return err
end
if redis.call('HSET', KEYS[1], ARGV[3], ARGV[4]) == 0 then
  return 0
end
local version = redis.call('HINCRBY', KEYS[1], '\0v', 1)
redis.call('ZADD', KEYS[2], version, ARGV[3])
-- The order zset is created again after the dict was empty: give it its TTL.
redis.call('EXPIRE', KEYS[2], ttl)
return 1
