-- l.insert(i, x) with Python's clamping: a negative i counts from the end, and an index
-- outside the list means its start or its end. ARGV[3] the index, ARGV[4] the encoded item.
local h, err = open_list('')
if not h then
  return err
end
local n = redis.call('LLEN', KEYS[2])
local i = tonumber(ARGV[3])
if i < 0 then
  i = math.max(0, i + n)
elseif i > n then
  i = n
end
insert_at(i, n, ARGV[4])
changed(h, true)
return n + 1
