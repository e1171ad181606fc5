-- Puts one item on a queue that may be bounded.
-- KEYS[1] items list, KEYS[2] state hash (maxsize), KEYS[3] putters list, KEYS[4] putting hash,
-- KEYS[5] unfinished counter (JoinableQueue; '' key name when not joinable), KEYS[6] the
-- claims hash (claims/mod.rs)
-- ARGV[1] TTL, ARGV[2] the item, ARGV[3] waiter id ('' to not wait), ARGV[4] liveness deadline,
-- ARGV[5] '1' when joinable, ARGV[6] the claim prefix
-- Returns 1 when the item was added; 0 when the queue is full (the waiter, if any, is queued and
-- will be woken when an item is taken).
local maxsize = tonumber(redis.call('HGET', KEYS[2], 'maxsize'))
if redis.call('EXISTS', KEYS[2]) == 0 then
  return redis.error_reply('GONE the queue does not exist')
end
if maxsize == nil then
  return redis.error_reply('CORRUPT maxsize is not a number')
end
redis.call('EXPIRE', KEYS[2], ARGV[1])
if maxsize > 0 and redis.call('LLEN', KEYS[1]) >= maxsize then
  if ARGV[3] ~= '' then
    redis.call('RPUSH', KEYS[3], ARGV[3])
    redis.call('HSET', KEYS[4], ARGV[3], ARGV[4])
    redis.call('EXPIRE', KEYS[3], ARGV[1])
    redis.call('EXPIRE', KEYS[4], ARGV[1])
  end
  return 0
end
redis.call('RPUSH', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[1])
-- Items claimed by gets live as long as the queue's items (claims_ttl.lua, prepended).
refresh_claims(KEYS[6], ARGV[6], ARGV[1])
if ARGV[5] == '1' then
  redis.call('INCR', KEYS[5])
  redis.call('EXPIRE', KEYS[5], ARGV[1])
end
return 1
