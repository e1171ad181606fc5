-- Connection.send: appends a message to the other end's inbox. The hot path, so it stands
-- alone (the prelude's functions cost Redis a closure each per call): TIME, one HMGET and the
-- RPUSH in the steady state. When a hold may have lapsed (`reap_at` passed), or no prelude
-- script ran for over half a lease (an outage ended: the holds move forward first), it sends
-- nothing and returns 0: `send_reaping.lua` does that, then sends.
-- KEYS: the pipe's keys (prelude.lua); ARGV[1] the lease (ms), ARGV[2] TTL (s), ARGV[3] this
-- end (0 or 1), ARGV[4] the message.
-- Returns 1 when sent. Errors: GONE, CLOSED (every holder of this end let go: its lease
-- lapsed), BROKEN (every holder of the other end let go).
-- TTLs: the inbox gets one when it is created; state and inbox are refreshed every tenth of the
-- TTL (the holders' heartbeat refreshes every key too).
local me = ARGV[3]
local other = me == '0' and '1' or '0'
local state = redis.call('HMGET', KEYS[1], 'closed:' .. me, 'closed:' .. other, 'refreshed',
  'reap_at', 'ran')
if not state[1] then
  -- Both closed fields are set when the pipe is created.
  return redis.error_reply('GONE the pipe does not exist')
end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
if now >= (tonumber(state[4]) or 0) or now - (tonumber(state[5]) or now) > tonumber(ARGV[1]) / 2 then
  return 0
end
if state[1] == '1' then
  return redis.error_reply('CLOSED every holder of this end closed it')
end
if state[2] == '1' then
  return redis.error_reply('BROKEN the other end is closed')
end
local target = me == '0' and KEYS[5] or KEYS[4]
local ttl = ARGV[2]
local created = redis.call('RPUSH', target, ARGV[4]) == 1
local due = now - (tonumber(state[3]) or 0) > tonumber(ttl) * 100
-- A message to a reader that keeps up makes the inbox anew each time: it needs its TTL then,
-- the state only when due.
if created or due then
  redis.call('EXPIRE', target, ttl)
end
if due then
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('HSET', KEYS[1], 'refreshed', now)
end
return 1
