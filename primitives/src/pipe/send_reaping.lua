-- Connection.send when a hold may have lapsed or an outage ended (`send.lua` found `reap_at`
-- passed, or no script ran for over half a lease, and sent nothing): moves the holds forward
-- after an outage, reaps the lapsed holds, then appends the message to the other end's inbox.
-- ARGV[3] this end (0 or 1), ARGV[4] the message.
-- Errors: GONE, CLOSED (every holder of this end let go: its lease lapsed), BROKEN (every holder
-- of the other end let go).
-- TTLs: the inbox gets one when it is created; state and inbox are refreshed every tenth of the
-- TTL (the holders' heartbeat refreshes every key too).
local me = tonumber(ARGV[3])
local fields = { 'closed:' .. me, 'closed:' .. (1 - me), 'refreshed', 'reap_at', 'ran' }
local state = redis.call('HMGET', KEYS[1], unpack(fields))
if not state[1] then
  -- Both closed fields are set when the pipe is created.
  return redis.error_reply('GONE the pipe does not exist')
end
-- An old pipe without `ran`: resume() would read it again; '' reads as none.
local reaped
if resume(state[5] or '') then
  reaped = reap()
else
  reaped = reap(state[4])
end
if reaped then
  state = redis.call('HMGET', KEYS[1], unpack(fields))
end
if state[1] == '1' then
  return redis.error_reply('CLOSED every holder of this end closed it')
end
if state[2] == '1' then
  return redis.error_reply('BROKEN the other end is closed')
end
local target = inbox[2 - me]
if redis.call('RPUSH', target, ARGV[4]) == 1 or now - (tonumber(state[3]) or 0) > tonumber(ttl) * 100 then
  redis.call('EXPIRE', target, ttl)
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('HSET', KEYS[1], 'refreshed', now)
end
return 1
