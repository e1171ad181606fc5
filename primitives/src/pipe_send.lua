-- Connection.send: append a message to the other end's inbox.
-- KEYS[1] state hash (closed:0, closed:1, refreshed), KEYS[2] the other end's inbox
-- ARGV[1] TTL, ARGV[2] this end (0 or 1), ARGV[3] the message, ARGV[4] now (ms)
-- Errors: GONE, CLOSED (this end was closed), BROKEN (the other end was closed).
-- TTLs: the inbox gets one when it is created; both are refreshed every tenth of the TTL.
local me = tonumber(ARGV[2])
local state = redis.call('HMGET', KEYS[1], 'closed:0', 'closed:1', 'refreshed')
local mine, theirs = state[me + 1], state[2 - me]
if not mine then
  return redis.error_reply('GONE the pipe does not exist')
end
if mine == '1' then
  return redis.error_reply('CLOSED this end is closed')
end
if theirs == '1' then
  return redis.error_reply('BROKEN the other end is closed')
end
local now = tonumber(ARGV[4])
if redis.call('RPUSH', KEYS[2], ARGV[3]) == 1 or now - (tonumber(state[3]) or 0) > tonumber(ARGV[1]) * 100 then
  redis.call('EXPIRE', KEYS[2], ARGV[1])
  redis.call('EXPIRE', KEYS[1], ARGV[1])
  redis.call('HSET', KEYS[1], 'refreshed', now)
end
return 1
