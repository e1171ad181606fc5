-- len(dict), and the version an iterator starts from.
-- KEYS as dict_get.lua. Returns {number of keys, version}.
local h, err = open()
if not h then
  return err
end
local n = redis.call('ZCARD', KEYS[2]) - 1
if n < 0 then
  return lost_order()
end
return {n, h[1]}
