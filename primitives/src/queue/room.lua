-- A writer waiting for room on a bounded queue checks, after each slice of its wait, whether
-- there is room that no wake-up brought it: a get wakes one writer per item taken, and a wake-up
-- that went to a writer which died meanwhile would otherwise leave the others waiting beside
-- free room for ever.
-- KEYS[1] items list, KEYS[2] state hash (maxsize), KEYS[3] putters list, KEYS[4] putting hash
-- ARGV[1] the waiter id
-- Returns 1 when there is room: the waiter has left the writers' queue and puts again (put.lua);
-- 0 otherwise (its check-in refreshed the queue's TTLs). Errors: GONE, CORRUPT.
if redis.call('EXISTS', KEYS[2]) == 0 then
  return redis.error_reply('GONE the queue does not exist')
end
local maxsize = tonumber(redis.call('HGET', KEYS[2], 'maxsize'))
if maxsize == nil then
  return redis.error_reply('CORRUPT maxsize is not a number')
end
if maxsize > 0 and redis.call('LLEN', KEYS[1]) >= maxsize then
  return 0
end
redis.call('LREM', KEYS[3], 0, ARGV[1])
redis.call('HDEL', KEYS[4], ARGV[1])
return 1
