-- Ends a generation of a barrier, or breaks it.
-- KEYS[1] state hash, KEYS[2] waiters list, KEYS[3] the callers that came while the action ran
-- ARGV[1] TTL, ARGV[2] wake key prefix, ARGV[3] operation, ARGV[4] generation, ARGV[5] waiter id
-- release: the action ran; wake the waiters of generation ARGV[4] with 'go'.
-- break:   the action failed; abort: abort(); both put the barrier in the broken state.
-- reset:   waiters get 'broken'; the barrier starts a new, unbroken generation.
-- timeout: waiter ARGV[5] gives up: if a wake-up reached it, return it ('go' or 'broken');
--          'wait' while every party arrived and the action runs (its release ends this
--          generation, for this caller too: in Python the action holds the lock a waiter needs
--          to time out); otherwise break the barrier (Python breaks it for everyone) and return
--          'broken'.
-- withdraw: waiter ARGV[5] leaves (its async caller went away): if a wake-up reached it, return
--          it; otherwise it no longer counts as arrived (asyncio.Barrier's cancelled waiter) and
--          'withdrawn' is returned.
-- Every operation that ends a generation or breaks the barrier wakes the callers entering
-- (KEYS[3]) with 'again': they arrive again, in the next generation or at a broken barrier.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return redis.error_reply('GONE the barrier does not exist')
end
local op = ARGV[3]
local generation = tonumber(redis.call('HGET', KEYS[1], 'generation'))
-- Pushes `message` to the wake key of every caller in `list`, and empties it.
local function wake_list(list, message)
  for _, waiter in ipairs(redis.call('LRANGE', list, 0, -1)) do
    local wake = ARGV[2] .. waiter
    redis.call('RPUSH', wake, message)
    redis.call('EXPIRE', wake, ARGV[1])
  end
  redis.call('DEL', list)
end
local function wake_all(message)
  wake_list(KEYS[2], message)
  wake_list(KEYS[3], 'again')
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
if op == 'timeout' or op == 'withdraw' then
  local wake = ARGV[2] .. ARGV[5]
  local got = redis.call('LPOP', wake)
  if got then
    redis.call('DEL', wake)
    return got
  end
  -- A caller entering had not arrived: it just leaves.
  if op == 'withdraw' and redis.call('LREM', KEYS[3], 0, ARGV[5]) > 0 then
    return 'withdrawn'
  end
  local s = redis.call('HMGET', KEYS[1], 'parties', 'count', 'broken')
  local parties, count = tonumber(s[1]) or 0, tonumber(s[2]) or 0
  if parties > 0 and count >= parties and s[3] == '0' then
    -- Every party arrived: the runner of the action releases them all. Leaving changes
    -- nothing of that generation (a withdrawn caller's 'go' lands in a key that expires).
    if op == 'withdraw' then
      return 'withdrawn'
    end
    return 'wait'
  end
  if op == 'withdraw' then
    if redis.call('LREM', KEYS[2], 0, ARGV[5]) > 0 then
      redis.call('HSET', KEYS[1], 'count', math.max(count - 1, 0))
    end
    return 'withdrawn'
  end
  op = 'break'
end
if op == 'release' then
  if generation == tonumber(ARGV[4]) and redis.call('HGET', KEYS[1], 'broken') == '0' then
    wake_all('go')
    redis.call('HSET', KEYS[1], 'count', 0, 'generation', generation + 1)
    return 'go'
  end
  return 'broken'
end
if op == 'break' or op == 'abort' then
  wake_all('broken')
  redis.call('HSET', KEYS[1], 'broken', 1, 'count', 0)
  return 'broken'
end
if op == 'reset' then
  wake_all('broken')
  redis.call('HSET', KEYS[1], 'broken', 0, 'count', 0, 'generation', generation + 1)
  return 'reset'
end
return redis.error_reply('ERR unknown barrier operation')
