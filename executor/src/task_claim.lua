-- Claims a process task for the worker that runs it.
-- KEYS[1] task record, KEYS[2] status hash
-- ARGV[1] worker pid, ARGV[2] now (unix ms), ARGV[3] TTL in seconds
-- Returns the task record. Errors: NOTASK (missing or expired), CLAIMED (another worker has it).
local task = redis.call('GET', KEYS[1])
if not task then
  return redis.error_reply('NOTASK no task record at ' .. KEYS[1])
end
if redis.call('HEXISTS', KEYS[2], 'state') == 1 then
  return redis.error_reply('CLAIMED task ' .. KEYS[1] .. ' already has a worker')
end
redis.call('HSET', KEYS[2], 'state', 'running', 'pid', ARGV[1], 'started_ms', ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return task
