-- l[i] = value. ARGV[3] the index, ARGV[4] the encoded value.
-- Returns 1, or 0 when i is outside the list (nothing changes).
local h, err = open_list('')
if not h then
  return err
end
local i = index(ARGV[3], redis.call('LLEN', KEYS[2]))
if not i then
  return 0
end
redis.call('LSET', KEYS[2], i, ARGV[4])
changed(h, false)
return 1
