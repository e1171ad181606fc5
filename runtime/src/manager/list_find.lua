-- l.index(x) (ARGV[4] 'index': the first position, -1 when absent) and l.count(x)
-- (ARGV[4] 'count'). ARGV[3] the encoded item.
local h, err = open()
if not h then
  return err
end
if ARGV[4] == 'count' then
  return #redis.call('LPOS', KEYS[2], ARGV[3], 'COUNT', 0)
end
local position = redis.call('LPOS', KEYS[2], ARGV[3])
if not position then
  return -1
end
return position
