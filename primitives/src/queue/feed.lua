-- Appends one feeder batch to a queue, at most once. A writer (a process's record of the queue)
-- numbers its batches for this queue 1, 2, 3... and sends them one at a time, so the highest
-- number applied is all that needs remembering: a batch sent again after an ambiguous failure (a
-- response timeout, a dropped connection) carries a number already applied and is skipped. With
-- it the writer's count of items through that batch is kept, so that the writer can tell which of
-- its items are in Redis (Queue.qsize).
-- KEYS[1] items list, KEYS[2] state hash, KEYS[3] this writer's hash (batch: the last batch
-- applied, items: the writer's count of items through it), KEYS[4] the claims hash (claims/mod.rs)
-- ARGV[1] TTL, ARGV[2] the batch's number, ARGV[3] the count through it, ARGV[4] the claim
-- prefix, ARGV[5..] the items
-- Returns 1 when the batch was appended, 0 when it had been applied before.
-- Errors (nothing written): GONE (the queue's keys are gone), WRONGTYPE (a key holds another
-- type), CORRUPT (the last batch is not a number).
if redis.call('EXISTS', KEYS[2]) == 0 then
  return redis.error_reply('GONE the queue does not exist')
end
local items_type = redis.call('TYPE', KEYS[1]).ok
if items_type ~= 'list' and items_type ~= 'none' then
  return redis.error_reply('WRONGTYPE the items key holds a ' .. items_type .. ', not a list')
end
local writer_type = redis.call('TYPE', KEYS[3]).ok
if writer_type ~= 'hash' and writer_type ~= 'none' then
  return redis.error_reply('WRONGTYPE the writer key holds a ' .. writer_type .. ', not a hash')
end
local applied = tonumber(redis.call('HGET', KEYS[3], 'batch') or '0')
local batch = tonumber(ARGV[2])
if applied == nil or batch == nil then
  return redis.error_reply('CORRUPT the last batch applied is not a number')
end
local appended = 0
if batch > applied then
  -- unpack() of too many values overflows Lua's stack: push in slices.
  for first = 5, #ARGV, 1000 do
    redis.call('RPUSH', KEYS[1], unpack(ARGV, first, math.min(first + 999, #ARGV)))
  end
  redis.call('HSET', KEYS[3], 'batch', batch, 'items', ARGV[3])
  appended = 1
end
redis.call('EXPIRE', KEYS[3], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[1])
-- Items claimed by gets live as long as the queue's items (claims_ttl.lua, prepended).
refresh_claims(KEYS[4], ARGV[4], ARGV[1])
return appended
