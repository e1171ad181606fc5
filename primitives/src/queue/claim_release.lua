-- A holder gives back what it claims and did not return (its acks were applied before this
-- script, on the same connection): to the head of the queue, in order.
-- KEYS[4] the holder's claim; ARGV[1] TTL, ARGV[2] claim prefix, ARGV[3] holder
-- Returns how many items went back.
local n = give_back(ARGV[2], ARGV[3])
redis.call('HDEL', KEYS[3], ARGV[3])
if n > 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[1])
end
return n
