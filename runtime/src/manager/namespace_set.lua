-- n.name = value. KEYS as namespace_get.lua. ARGV[3] the attribute's field, ARGV[4] the value.
local h, err = open()
if not h then
  return err
end
redis.call('HSET', KEYS[1], ARGV[3], ARGV[4])
return 1
