-- A holder's fetch: gives back what it still claims (it returned all it could: its acks were
-- applied before this script) and what its BLMOVE took, gives back the claims of holders whose
-- hold lapsed, then claims up to ARGV[5] items from the head of the queue (1 while another
-- holder's hold runs; at most ARGV[7] bytes, at least one item) and holds them for ARGV[6] ms.
-- When it finds nothing and the holder will wait (ARGV[8] > 0: for that many ms), the holder's
-- record stays for the wait and a hold, so that what its BLMOVE takes can be reaped if it dies.
-- A holder numbers its fetches' items in one sequence that only grows (ARGV[4]: the first number
-- this fetch may use; the holder reserved ARGV[5] numbers from it), and its fence (KEYS[5],
-- `<holder>:fence`) keeps the highest first number run: a fetch that arrives late (sent on a
-- connection given up for lost) finds a later one ran, and does nothing.
-- KEYS[4] the holder's claim (sorted set), KEYS[5] the fences hash
-- ARGV[1] TTL, ARGV[2] claim prefix, ARGV[3] holder, ARGV[4] the number of the first item,
-- ARGV[5] most items, ARGV[6] hold (ms), ARGV[7] most bytes, ARGV[8] the wait (ms) or 0
-- Returns {first number, item...}; {first number} when the queue is empty.
-- Errors: GONE (the queue's keys are gone), STALE (a later fetch of this holder ran).
if redis.call('EXISTS', KEYS[2]) == 0 then
  return redis.error_reply('GONE the queue does not exist')
end
local ttl = ARGV[1]
local prefix = ARGV[2]
local me = ARGV[3]
local first = tonumber(ARGV[4])
local want = tonumber(ARGV[5])
local fence = tonumber(redis.call('HGET', KEYS[5], me .. ':fence') or '-1')
if first <= fence then
  -- What a late BLMOVE sent with this fetch moved goes back to the head: nothing would claim it.
  while redis.call('LMOVE', KEYS[4] .. ':in', KEYS[1], 'RIGHT', 'LEFT') do
  end
  return redis.error_reply('STALE a later fetch of this holder ran')
end
redis.call('HSET', KEYS[5], me .. ':fence', first)
redis.call('EXPIRE', KEYS[5], ttl)
local now = now_ms()
give_back(prefix, me)
if reap(prefix, now, me) then
  want = 1
end
redis.call('EXPIRE', KEYS[2], ttl)
-- Read in slices, so that a run of large items past the byte limit is not all loaded.
local most_bytes = tonumber(ARGV[7])
local items = {}
local bytes = 0
local full = false
while not full and #items < want do
  local from = #items
  local slice = redis.call('LRANGE', KEYS[1], from, from + math.min(32, want - from) - 1)
  if #slice == 0 then
    break
  end
  for _, item in ipairs(slice) do
    if #items > 0 and bytes + #item > most_bytes then
      full = true
      break
    end
    bytes = bytes + #item
    items[#items + 1] = item
  end
  if #slice < math.min(32, want - from) then
    break
  end
end
local n = #items
if n == 0 then
  local wait = tonumber(ARGV[8])
  if wait > 0 then
    redis.call('HSET', KEYS[3], me, now + wait + tonumber(ARGV[6]))
    redis.call('EXPIRE', KEYS[1], ttl)
    refresh_claims(KEYS[3], prefix, ttl)
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
  -- The score as the same integer text as the member's prefix: a Lua number passed to
  -- redis.call is written with '%.17g' (Redis 7.0), which costs more than the rest of the loop.
  local number = string.format('%d', first + i - 1)
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
