-- del n.name. KEYS as namespace_get.lua. ARGV[3] the attribute's field.
-- Returns 1, or 0 when there was no such attribute.
local h, err = open()
if not h then
  return err
end
return redis.call('HDEL', KEYS[1], ARGV[3])
