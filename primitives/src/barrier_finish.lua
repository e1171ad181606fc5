-- Ends a generation of a barrier, breaks it, or answers a waiter.
-- KEYS[1] state hash, KEYS[2] waiters list, KEYS[3] the callers that came while the action ran
-- ARGV[1] TTL, ARGV[2] wake key prefix, ARGV[3] operation, ARGV[4] generation, ARGV[5] waiter id,
-- ARGV[6] the lease (ms).
-- release: the action of generation ARGV[4] ran; wake its waiters with 'go' and return 'go'.
--          Done already (a retry after a reply that was lost): 'go' again; the generation was
--          broken or reset meanwhile: 'broken'.
-- fail:    the action of generation ARGV[4] failed: break the barrier, unless that generation
--          ended or broke already (a retry); return 'broken'.
-- renew:   the runner of the action of generation ARGV[4] lives: its lease runs a lease from
--          now. 'renewed', or 'over' when that action's generation ended or broke.
-- abort:   abort(); puts the barrier in the broken state.
-- reset:   waiters get 'broken'; the barrier starts a new, unbroken generation.
-- timeout: waiter ARGV[5] gives up: if a wake-up reached it, return it ('go' or 'broken');
--          'wait' while every party arrived and the action runs (its release ends this
--          generation, for this caller too: in Python the action holds the lock a waiter needs
--          to time out) unless its runner is gone (then the barrier breaks); otherwise break
--          the barrier (Python breaks it for everyone) and return 'broken'.
-- probe:   waiter ARGV[5] checks in: if a wake-up reached it, return it; if every party arrived
--          and the runner of the action is gone, break the barrier and return 'broken';
--          otherwise 'wait'.
-- withdraw: waiter ARGV[5] leaves (its async caller went away): if a wake-up reached it, return
--          it; otherwise it no longer counts as arrived (asyncio.Barrier's cancelled waiter) and
--          'withdrawn' is returned.
-- Every operation that ends a generation or breaks the barrier wakes the callers entering
-- (KEYS[3]) with 'again': they arrive again, in the next generation or at a broken barrier.
--
-- The runner's lease: `acting` (ms, Redis's clock) while the action of the current generation
-- runs, 0 otherwise. The runner is gone once the lease lapsed and stayed lapsed for half a lease
-- after a waiter first saw it lapsed (`suspect`): a runner that Redis could not hear from during
-- an outage renews within that once it is back.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return redis.error_reply('GONE the barrier does not exist')
end
local op = ARGV[3]
local lease = tonumber(ARGV[6]) or 0
local generation = tonumber(redis.call('HGET', KEYS[1], 'generation'))
local function now_ms()
  local clock = redis.call('TIME')
  return tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
end
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
-- Whether the action of the current generation runs (every party arrived, not broken).
local function acting()
  local s = redis.call('HMGET', KEYS[1], 'parties', 'count', 'broken')
  local parties, count = tonumber(s[1]) or 0, tonumber(s[2]) or 0
  return parties > 0 and count >= parties and s[3] == '0'
end
-- Whether the runner of the running action is gone (see above). A barrier without the field
-- (written before it existed): never.
local function runner_gone()
  local s = redis.call('HMGET', KEYS[1], 'acting', 'suspect')
  local expiry = tonumber(s[1]) or 0
  if expiry == 0 then
    return false
  end
  local now = now_ms()
  if now <= expiry then
    return false
  end
  local suspect = tonumber(s[2]) or 0
  if suspect == 0 then
    redis.call('HSET', KEYS[1], 'suspect', now)
    return false
  end
  return now - suspect >= lease / 2
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
if op == 'renew' then
  if generation == tonumber(ARGV[4]) and acting() then
    redis.call('HSET', KEYS[1], 'acting', now_ms() + lease, 'suspect', 0)
    return 'renewed'
  end
  return 'over'
end
if op == 'probe' then
  -- Waiting is using the barrier, however long the action: the lists live on too.
  redis.call('EXPIRE', KEYS[2], ARGV[1])
  redis.call('EXPIRE', KEYS[3], ARGV[1])
end
if op == 'timeout' or op == 'withdraw' or op == 'probe' then
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
  if acting() then
    -- Every party arrived: the runner of the action releases them all. Leaving changes
    -- nothing of that generation (a withdrawn caller's 'go' lands in a key that expires).
    if op == 'withdraw' then
      return 'withdrawn'
    end
    if not runner_gone() then
      return 'wait'
    end
    -- The runner died (or was cut off for good): its action failed, as Python's _break().
    op = 'break'
  elseif op == 'probe' then
    return 'wait'
  elseif op == 'withdraw' then
    local count = tonumber(redis.call('HGET', KEYS[1], 'count')) or 0
    if redis.call('LREM', KEYS[2], 0, ARGV[5]) > 0 then
      redis.call('HSET', KEYS[1], 'count', math.max(count - 1, 0))
    end
    return 'withdrawn'
  else
    op = 'break'
  end
end
if op == 'release' then
  local s = redis.call('HMGET', KEYS[1], 'broken', 'released')
  if generation == tonumber(ARGV[4]) and s[1] == '0' then
    wake_all('go')
    redis.call('HSET', KEYS[1], 'count', 0, 'generation', generation + 1, 'acting', 0,
      'released', ARGV[4])
    return 'go'
  end
  if s[2] == ARGV[4] then
    return 'go'
  end
  return 'broken'
end
if op == 'fail' then
  if generation ~= tonumber(ARGV[4]) or redis.call('HGET', KEYS[1], 'broken') ~= '0' then
    return 'broken'
  end
  op = 'break'
end
if op == 'break' or op == 'abort' then
  wake_all('broken')
  redis.call('HSET', KEYS[1], 'broken', 1, 'count', 0, 'acting', 0)
  return 'broken'
end
if op == 'reset' then
  wake_all('broken')
  redis.call('HSET', KEYS[1], 'broken', 0, 'count', 0, 'generation', generation + 1, 'acting', 0)
  return 'reset'
end
return redis.error_reply('ERR unknown barrier operation')
