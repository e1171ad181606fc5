-- Creates an actor's state and mailbox, or finds a named one.
-- KEYS[1] state hash, KEYS[2] mailbox stream (created by the first message), KEYS[3] fencing
-- counter
-- ARGV[1] actor type, ARGV[2] initial state, ARGV[3] '1' when its messages must be signed,
-- ARGV[4] TTL seconds, ARGV[5] 'new' (fail if it exists) or 'named' (create if absent),
-- ARGV[6] the creator's verifier for this actor ('' unless signed): see mod.rs, "Authentication"
-- Returns 'created' or 'exists'. Errors: EXISTS (new, already there), TYPE (named, another type),
-- AUTH (named, signed under another authkey).
local current = redis.call('HMGET', KEYS[1], 'type', 'verifier')
if current[1] then
  if ARGV[5] == 'new' then
    return redis.error_reply('EXISTS the actor already exists')
  end
  if current[1] ~= ARGV[1] then
    return redis.error_reply('TYPE the actor is a ' .. current[1] .. ', not a ' .. ARGV[1])
  end
  if (current[2] or '') ~= '' and current[2] ~= ARGV[6] then
    if ARGV[6] == '' then
      return redis.error_reply('AUTH it takes signed messages only (ActorOptions::authenticate)')
    end
    return redis.error_reply('AUTH it was created under another authkey')
  end
  -- Found: its keys live `ARGV[4]` from now, together (a mailbox that expired before its
  -- state would lose the messages waiting in it).
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  redis.call('EXPIRE', KEYS[2], ARGV[4])
  redis.call('EXPIRE', KEYS[3], ARGV[4])
  return 'exists'
end
redis.call('HSET', KEYS[1], 'type', ARGV[1], 'data', ARGV[2], 'applied', '0-0', 'auth', ARGV[3],
  'verifier', ARGV[6], 'status', 'active', 'failures', '')
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call('EXPIRE', KEYS[3], ARGV[4])
return 'created'
