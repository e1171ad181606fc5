-- The read of l.sort(): freezes the list (writes wait, see list_prelude.lua) and returns
-- {version, item, item, ...}. ARGV[3] the sort's token, ARGV[4] how long the freeze may last (ms,
-- from Redis's clock: see redis_now in list_prelude.lua).
-- FROZEN while another sort holds a live freeze. The freeze is lifted by the sort's write
-- (list_replace.lua), or by list_sort_abort.lua when the sort ends without one.
local h, err = open_list('')
if not h then
  return err
end
redis.call('HSET', KEYS[1], '\0f', ARGV[3] .. '|' .. (redis_now() + tonumber(ARGV[4])))
local items = redis.call('LRANGE', KEYS[2], 0, -1)
table.insert(items, 1, h[1])
return items
