-- dict.clear(). The version changes only when the dict had keys (as Python's size check).
-- KEYS as dict_get.lua. Returns the number of keys removed.
local h, err = open()
if not h then
  return err
end
local n = redis.call('ZCARD', KEYS[2]) - 1
if n <= 0 then
  return 0
end
-- Everything but the order's first member, the '\0' that keeps it existing.
redis.call('ZREMRANGEBYRANK', KEYS[2], 1, -1)
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], '\0v', tonumber(h[1]) + 1, '\0r', h[2] or now)
redis.call('EXPIRE', KEYS[1], ttl)
return n
