-- Written before a waiting get's BLMOVE, in the same round trip: the holder's record in the
-- claims hash holds for the wait and a hold, so that what the BLMOVE moves into its landing list
-- can be reaped if the holder dies before the fetch behind it runs. A later deadline stays.
-- KEYS[1] the claims hash; ARGV[1] holder, ARGV[2] how long (ms), ARGV[3] TTL
local t = redis.call('TIME')
local deadline = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[2])
if (tonumber(redis.call('HGET', KEYS[1], ARGV[1])) or 0) < deadline then
  redis.call('HSET', KEYS[1], ARGV[1], deadline)
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
