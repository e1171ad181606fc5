-- len(dict), and the version an iterator starts from.
-- KEYS as dict_get.lua. Returns {number of keys, version}.
local h, err = open()
if not h then
  return err
end
return {redis.call('ZCARD', KEYS[2]), h[1]}
