-- A holder gives back what it claims and did not return (its acks were applied before this
-- script, on the same connection): to the head of the queue, in order. ARGV[4] is the first
-- number the holder had not reserved when it decided to give back: if a fetch from that number
-- on ran since (this release arrived late, on a connection given up for lost), the claim is
-- that fetch's and nothing is given back.
-- The holder's next item may be in doubt (ARGV[5] 'doubt': an ack of it was written and its
-- outcome is not known); it is ARGV[6] with payload ARGV[7]. When it is not in the claim any
-- more and an ack of it was applied (recorded in `<holder>:acked`), it goes back first, at the
-- head, and the record is dropped: a second run of this release (its first reply lost) does
-- not push it again, and the holder, asking `claim_ack.lua`, learns it is not its own. Otherwise
-- it is in the claim (given back with it) or a reaper gave it back already.
-- ARGV[8] 'forget' (optional): the holder gets no more (its consumer retired, the queue closed in
-- its process, its exit), so its fields in the fences hash go too, after the doubt is settled: a
-- later fetch of it sets its fence again, above every number it used.
-- KEYS[4] the holder's claim, KEYS[5] the fences hash
-- ARGV[1] TTL, ARGV[2] claim prefix, ARGV[3] holder, ARGV[4] the first number not reserved,
-- ARGV[5] '' or 'doubt', ARGV[6] the item's number, ARGV[7] its payload, ARGV[8] '' or 'forget'
-- Returns how many items went back.
local fence = tonumber(redis.call('HGET', KEYS[5], ARGV[3] .. ':fence') or '-1')
if fence >= tonumber(ARGV[4]) then
  return 0
end
local number = tonumber(ARGV[6])
local first_back = false
if ARGV[5] == 'doubt' then
  local in_claim = #redis.call('ZRANGEBYSCORE', KEYS[4], number, number) > 0
  local acked = tonumber(redis.call('HGET', KEYS[5], ARGV[3] .. ':acked') or '-1')
  first_back = (not in_claim) and acked >= number
end
local n = give_back(ARGV[2], ARGV[3])
if first_back then
  redis.call('LPUSH', KEYS[1], ARGV[7])
  redis.call('HDEL', KEYS[5], ARGV[3] .. ':acked')
  n = n + 1
end
redis.call('HDEL', KEYS[3], ARGV[3])
if ARGV[8] == 'forget' then
  redis.call('HDEL', KEYS[5], ARGV[3] .. ':fence', ARGV[3] .. ':acked')
end
if n > 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[1])
end
return n
