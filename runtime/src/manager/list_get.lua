-- l[i]: the item (nil when i is outside the list; a negative i counts from the end).
-- ARGV[3] the index.
local h, err = open()
if not h then
  return err
end
return redis.call('LINDEX', KEYS[2], ARGV[3])
