-- dict.clear(). The version changes only when the dict had keys (as Python's size check).
-- KEYS as dict_get.lua. Returns the number of keys removed.
local h, err = open()
if not h then
  return err
end
local n = redis.call('ZCARD', KEYS[2]) - 1
if n < 0 then
  return lost_order()
end
if n == 0 then
  return 0
end
-- Everything but the order's first member, the '\0' that keeps it existing.
redis.call('ZREMRANGEBYRANK', KEYS[2], 1, -1)
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], '\0v', tonumber(h[1]) + 1)
-- The data hash was made again, so it needs a TTL: every key gets it at once (and '\0r' records
-- it), as open() refreshes them. Had only the data got a fresh one, the order and the manager's
-- keys could expire first, and the dict would live on with no order (see dict_prelude.lua).
refresh()
return n
