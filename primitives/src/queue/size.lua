-- A queue's size: the items in the list and those claimed by gets and not yet returned (or moved
-- by a waiting get's BLMOVE and not claimed yet), with
-- what this process's feeder applied (the writer hash of its record of the queue).
-- KEYS[4] that writer hash (feed.lua); ARGV[1] claim prefix
-- Returns {1, length, claimed, items applied by this writer or false}.
-- Errors: GONE (the queue's keys are gone).
if redis.call('EXISTS', KEYS[2]) == 0 then
  return redis.error_reply('GONE the queue does not exist')
end
local claimed = 0
for _, holder in ipairs(redis.call('HKEYS', KEYS[3])) do
  claimed = claimed + redis.call('ZCARD', ARGV[1] .. holder)
    + redis.call('LLEN', ARGV[1] .. holder .. ':in')
end
return {1, redis.call('LLEN', KEYS[1]), claimed, redis.call('HGET', KEYS[4], 'items')}
