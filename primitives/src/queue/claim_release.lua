-- A holder gives back what it claims and did not return (its acks were applied before this
-- script, on the same connection): to the head of the queue, in order. ARGV[4] is the first
-- number the holder had not reserved when it decided to give back: if a fetch from that number
-- on ran since (this release arrived late, on a connection given up for lost), the claim is
-- that fetch's and nothing is given back.
-- KEYS[4] the holder's claim, KEYS[5] the fences hash
-- ARGV[1] TTL, ARGV[2] claim prefix, ARGV[3] holder, ARGV[4] the first number not reserved
-- Returns how many items went back.
local fence = tonumber(redis.call('HGET', KEYS[5], ARGV[3] .. ':fence') or '-1')
if fence >= tonumber(ARGV[4]) then
  return 0
end
local n = give_back(ARGV[2], ARGV[3])
redis.call('HDEL', KEYS[3], ARGV[3])
if n > 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[1])
end
return n
