-- dict.popitem(): removes and returns the last inserted pair (LIFO, as Python's).
-- KEYS as dict_get.lua. Returns {key, value}, or an empty array when the dict is empty.
local h, err = open()
if not h then
  return err
end
local last = redis.call('ZRANGE', KEYS[2], -1, -1)
if #last == 0 then
  return lost_order()
end
if last[1] == '\0' then
  return {}
end
local value = redis.call('HGET', KEYS[1], last[1])
if not value then
  return redis.error_reply('CORRUPT a key in the order has no value')
end
redis.call('HDEL', KEYS[1], last[1])
redis.call('HSET', KEYS[1], '\0v', tonumber(h[1]) + 1)
redis.call('ZREM', KEYS[2], last[1])
return {last[1], value}
