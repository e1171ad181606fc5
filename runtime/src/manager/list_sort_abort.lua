-- Lifts the freeze of the sort ARGV[3] if it still holds it: a sort that failed, panicked or
-- was dropped between its read (list_sort_begin.lua) and its write (list_replace.lua). A freeze
-- of another sort (this one's lapsed, and another froze the list since) is left alone; the list
-- does not change, so its version does not either.
-- Returns 1 when the freeze was lifted, 0 when this sort held none.
local h, err = open('\0f')
if not h then
  return err
end
if h[3] and string.sub(h[3], 1, #ARGV[3] + 1) == ARGV[3] .. '|' then
  redis.call('HDEL', KEYS[1], '\0f')
  return 1
end
return 0
