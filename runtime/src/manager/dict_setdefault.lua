-- dict.setdefault(key, default): the value when the key is present, else inserts the default.
-- KEYS as dict_get.lua. ARGV[3] the encoded key, ARGV[4] the encoded default.
-- Returns the value now under the key.
local h, err = open(ARGV[3])
if not h then
  return err
end
if h[3] then
  return h[3]
end
if not has_order() then
  return lost_order()
end
local version = tonumber(h[1]) + 1
redis.call('HSET', KEYS[1], ARGV[3], ARGV[4], '\0v', version)
redis.call('ZADD', KEYS[2], version, ARGV[3])
return ARGV[4]
