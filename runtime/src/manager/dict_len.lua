-- len(dict), and the version an iterator starts from.
-- KEYS as dict_get.lua. Returns {number of keys, version}.
local h, err = open()
if not h then
  return err
end
return {math.max(0, redis.call('ZCARD', KEYS[2]) - 1), h[1]}
