-- to_vec (everything), sort's read and iteration (a page at a time).
-- ARGV[3] the first index, ARGV[4] most items (0: all), ARGV[5] the shape the iteration
-- started at ('' for none).
-- Returns {version, shape, item, item, ...}; only {version, shape} when ARGV[5] is given and
-- the shape differs (items were inserted, removed or moved since).
local h, err = open_list()
if not h then
  return err
end
if ARGV[5] ~= '' and h[3] ~= ARGV[5] then
  return {h[1], h[3]}
end
local start = tonumber(ARGV[3])
local stop = -1
if tonumber(ARGV[4]) > 0 then
  stop = start + tonumber(ARGV[4]) - 1
end
local items = redis.call('LRANGE', KEYS[2], start, stop)
table.insert(items, 1, h[3])
table.insert(items, 1, h[1])
return items
