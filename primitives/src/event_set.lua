-- Event.set (ARGV[3] = '1': wake every waiter) or Event.clear (ARGV[3] = '0').
-- KEYS[1] state hash, KEYS[2] waiters list, KEYS[3] waiting hash
-- ARGV[1] TTL, ARGV[2] wake key prefix, ARGV[3] the new flag
if redis.call('EXISTS', KEYS[1]) == 0 then
  return redis.error_reply('GONE the event does not exist')
end
redis.call('HSET', KEYS[1], 'flag', ARGV[3])
local woken = 0
if ARGV[3] == '1' then
  local waiters = redis.call('LRANGE', KEYS[2], 0, -1)
  for _, waiter in ipairs(waiters) do
    local wake = ARGV[2] .. waiter
    redis.call('RPUSH', wake, 1)
    redis.call('EXPIRE', wake, ARGV[1])
    woken = woken + 1
  end
  redis.call('DEL', KEYS[2], KEYS[3])
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return woken
