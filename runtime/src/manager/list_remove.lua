-- l.remove(x): removes the first item equal to x (same encoding).
-- ARGV[3] the encoded item. Returns 1, or 0 when no item is equal (nothing changes).
local h, err = open_list('')
if not h then
  return err
end
if redis.call('LREM', KEYS[2], 1, ARGV[3]) == 0 then
  return 0
end
changed(h, true)
return 1
