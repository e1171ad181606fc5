-- Event.wait, first step: 1 when the flag is set; otherwise queue the waiter and return 0.
-- KEYS[1] state hash (flag), KEYS[2] waiters list, KEYS[3] waiting hash
-- ARGV[1] now, ARGV[2] TTL, ARGV[3] waiter id, ARGV[4] liveness deadline (ms)
local flag = redis.call('HGET', KEYS[1], 'flag')
if not flag then
  return redis.error_reply('GONE the event does not exist')
end
for i = 1, 3 do
  redis.call('EXPIRE', KEYS[i], ARGV[2])
end
if flag == '1' then
  return 1
end
if flag ~= '0' then
  return redis.error_reply('CORRUPT the flag is not 0 or 1')
end
redis.call('RPUSH', KEYS[2], ARGV[3])
redis.call('HSET', KEYS[3], ARGV[3], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('EXPIRE', KEYS[3], ARGV[2])
return 0
