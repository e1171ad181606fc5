-- Connection.close: mark this end closed and put an end-of-file marker (an empty message) in
-- the inboxes whose readers must learn it: the other end's (it reads everything sent before,
-- then EOF) and, if this end can receive, its own (a reader blocked on it wakes).
-- KEYS[1] state hash, KEYS[2] the other end's inbox, KEYS[3] this end's inbox
-- ARGV[1] TTL, ARGV[2] this end, ARGV[3] '1' when the other end receives, ARGV[4] '1' when this
-- end receives
if redis.call('EXISTS', KEYS[1]) == 0 then
  return redis.error_reply('GONE the pipe does not exist')
end
if redis.call('HGET', KEYS[1], 'closed:' .. ARGV[2]) == '1' then
  return 0
end
redis.call('HSET', KEYS[1], 'closed:' .. ARGV[2], 1)
for i = 2, 3 do
  if ARGV[i + 1] == '1' then
    redis.call('RPUSH', KEYS[i], '')
    redis.call('EXPIRE', KEYS[i], ARGV[1])
  end
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
