-- dict[key] = value. A new key is appended to the insertion order, scored by the new version.
-- KEYS as dict_get.lua. ARGV[3] the encoded key, ARGV[4] the encoded value.
-- The version ('\0v') counts the insertions and deletions of keys (an iterator compares it);
-- replacing a value does not change it. Returns 1 when the key is new, 0 when it was replaced.
-- Cost: 2 calls to replace, 4 to insert (the HMGET tells whether the key is new, the EXISTS that
-- the order is there).
local h, err = open(ARGV[3])
if not h then
  return err
end
if h[3] then
  redis.call('HSET', KEYS[1], ARGV[3], ARGV[4])
  return 0
end
if not has_order() then
  return lost_order()
end
local version = tonumber(h[1]) + 1
redis.call('HSET', KEYS[1], ARGV[3], ARGV[4], '\0v', version)
redis.call('ZADD', KEYS[2], version, ARGV[3])
return 1
