-- Connection.send: append a message to the other end's inbox.
-- KEYS[1] state hash (closed:0, closed:1), KEYS[2] the other end's inbox
-- ARGV[1] TTL, ARGV[2] this end (0 or 1), ARGV[3] the message
-- Errors: GONE, CLOSED (this end was closed), BROKEN (the other end was closed).
local mine = redis.call('HGET', KEYS[1], 'closed:' .. ARGV[2])
if not mine then
  return redis.error_reply('GONE the pipe does not exist')
end
if mine == '1' then
  return redis.error_reply('CLOSED this end is closed')
end
if redis.call('HGET', KEYS[1], 'closed:' .. (1 - tonumber(ARGV[2]))) == '1' then
  return redis.error_reply('BROKEN the other end is closed')
end
redis.call('RPUSH', KEYS[2], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
