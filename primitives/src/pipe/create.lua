-- Pipe::new: the state, and the creating process as the holder of both ends for a lease from
-- now. ARGV[3] duplex (0/1), ARGV[4] the process.
redis.call('HSET', KEYS[1], 'duplex', ARGV[3], 'closed:0', 0, 'closed:1', 0,
  'reap_at', now + lease, 'ran', now)
redis.call('EXPIRE', KEYS[1], ttl)
for e = 1, 2 do
  redis.call('HSET', holders[e], ARGV[4], now + lease)
  redis.call('EXPIRE', holders[e], ttl)
end
return 1
