-- dict.update(pairs): sets every pair, in order; new keys are appended to the insertion order.
-- KEYS as dict_get.lua. ARGV[3], ARGV[4], ... encoded key, encoded value pairs.
-- Returns the number of new keys.
local h, err = open()
if not h then
  return err
end
-- Before any write (an error after one would leave it done): new keys go in the order.
if not has_order() then
  return lost_order()
end
local version = tonumber(h[1])
local added = 0
for i = 3, #ARGV, 2 do
  if redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) == 1 then
    version = version + 1
    added = added + 1
    redis.call('ZADD', KEYS[2], version, ARGV[i])
  end
end
if added > 0 then
  redis.call('HSET', KEYS[1], '\0v', version)
end
return added
