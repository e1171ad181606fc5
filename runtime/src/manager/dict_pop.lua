-- del dict[key], dict.pop(key): removes the key and returns its value (nil when missing,
-- and nothing changes).
-- KEYS as dict_get.lua. ARGV[3] the encoded key.
local h, err = open(ARGV[3])
if not h then
  return err
end
if not h[3] then
  return nil
end
redis.call('HDEL', KEYS[1], ARGV[3])
redis.call('HSET', KEYS[1], '\0v', tonumber(h[1]) + 1)
redis.call('ZREM', KEYS[2], ARGV[3])
return h[3]
