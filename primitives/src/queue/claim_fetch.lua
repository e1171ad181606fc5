-- A holder's fetch: gives back what it still claims (it returned all it could: its acks were
-- applied before this script), and what its BLMOVE took, gives back the claims of holders whose
-- hold lapsed, then claims up to ARGV[5] items from the head of the queue (1 while another
-- holder's hold runs; at most ARGV[7] bytes, at least one item) and holds them for ARGV[6] ms.
-- When it finds nothing and the holder will wait (ARGV[8] > 0: for that many ms), the holder's
-- record stays for the wait and a hold, so that what its BLMOVE takes can be reaped if it dies.
-- KEYS[4] the holder's claim (sorted set)
-- ARGV[1] TTL, ARGV[2] claim prefix, ARGV[3] holder, ARGV[4] the number of the first item,
-- ARGV[5] most items, ARGV[6] hold (ms), ARGV[7] most bytes, ARGV[8] the wait (ms) or 0
-- Returns {first number, item...}; {first number} when the queue is empty.
-- Errors: GONE (the queue's keys are gone), CORRUPT.
if redis.call('EXISTS', KEYS[2]) == 0 then
  return redis.error_reply('GONE the queue does not exist')
end
local ttl = ARGV[1]
local prefix = ARGV[2]
local me = ARGV[3]
local first = tonumber(ARGV[4])
local want = tonumber(ARGV[5])
local now = now_ms()
give_back(prefix, me)
if reap(prefix, now, me) then
  want = 1
end
redis.call('EXPIRE', KEYS[2], ttl)
local items = redis.call('LRANGE', KEYS[1], 0, want - 1)
local most_bytes = tonumber(ARGV[7])
local bytes = 0
local n = 0
for _, item in ipairs(items) do
  if n > 0 and bytes + #item > most_bytes then
    break
  end
  bytes = bytes + #item
  n = n + 1
end
if n == 0 then
  local wait = tonumber(ARGV[8])
  if wait > 0 then
    redis.call('HSET', KEYS[3], me, now + wait + tonumber(ARGV[6]))
    redis.call('EXPIRE', KEYS[1], ttl)
    refresh_claims(prefix, ttl)
  else
    redis.call('HDEL', KEYS[3], me)
  end
  return {first}
end
redis.call('LTRIM', KEYS[1], n, -1)
redis.call('EXPIRE', KEYS[1], ttl)
local reply = {first}
local scored = {}
for i = 1, n do
  local number = first + i - 1
  scored[#scored + 1] = number
  scored[#scored + 1] = number .. ':' .. items[i]
  reply[i + 1] = items[i]
end
for at = 1, #scored, 1000 do
  redis.call('ZADD', KEYS[4], unpack(scored, at, math.min(at + 999, #scored)))
end
redis.call('HSET', KEYS[3], me, now + tonumber(ARGV[6]))
redis.call('EXPIRE', KEYS[3], ttl)
redis.call('EXPIRE', KEYS[4], ttl)
return reply
