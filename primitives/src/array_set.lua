-- Array.set / set_slice: write elements of an array that exists.
-- KEYS[1] the items hash; ARGV[1] TTL, then index, value pairs.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return redis.error_reply('GONE the array does not exist')
end
for i = 2, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
