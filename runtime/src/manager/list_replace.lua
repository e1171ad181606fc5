-- The write of l.sort(): replaces every item if the list was not written since the sort read it
-- (compare-and-set on the version: a write made after the freeze lapsed loses nothing), and
-- lifts the sort's freeze. ARGV[3] the sort's token, ARGV[4] the version read, ARGV[5..] the
-- encoded items.
-- Returns 1, or 0 when the version differs (nothing changes; the caller sorts again).
-- FROZEN when the freeze lapsed and another sort holds one now.
local h, err = open_list(ARGV[3])
if not h then
  return err
end
if h[4] and string.sub(h[4], 1, #ARGV[3] + 1) == ARGV[3] .. '|' then
  redis.call('HDEL', KEYS[1], '\0f')
end
if h[1] ~= ARGV[4] then
  return 0
end
redis.call('DEL', KEYS[2])
if #ARGV >= 5 then
  push_all(KEYS[2], ARGV, 5, #ARGV)
  redis.call('EXPIRE', KEYS[2], ttl)
end
changed(h, true)
return 1
