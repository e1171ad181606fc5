-- An acknowledgement written again after a failure, whose outcome the holder must know: takes
-- the items numbered up to ARGV[2] out of the holder's claim and records ARGV[2] as acknowledged
-- (`<holder>:acked` in the fences hash, which reapers leave alone).
-- An async get's holder (async_get.rs) acks its one item this way every time, and passes the
-- claims hash as KEYS[3]: its record there goes with the item (it claims nothing else), so that
-- other holders' fetches do not take it for a consumer still holding items.
-- KEYS[1] the holder's claim, KEYS[2] the fences hash, KEYS[3] (optional) the claims hash;
-- ARGV[1] holder, ARGV[2] the number, ARGV[3] TTL
-- Returns 1 when the item numbered ARGV[2] is the holder's (this call or an earlier one took it
-- out of the claim), 0 when it is not (it was given back to the queue before any ack of it).
local number = tonumber(ARGV[2])
local field = ARGV[1] .. ':acked'
local removed = redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', number)
local acked = tonumber(redis.call('HGET', KEYS[2], field) or '-1')
if removed > 0 then
  if number > acked then
    redis.call('HSET', KEYS[2], field, number)
    redis.call('EXPIRE', KEYS[2], ARGV[3])
  end
  if KEYS[3] then
    redis.call('HDEL', KEYS[3], ARGV[1])
  end
  return 1
end
if acked >= number then
  return 1
end
return 0
