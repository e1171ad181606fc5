-- JoinableQueue.task_done (ARGV[3] = 'done') or the first step of join (ARGV[3] = 'join').
-- KEYS[1] unfinished counter, KEYS[2] joiners list, KEYS[3] joining hash, KEYS[4] state hash
-- ARGV[1] TTL, ARGV[2] wake key prefix, ARGV[3] operation, ARGV[4] waiter id, ARGV[5] liveness
-- deadline. done: errors TOOMANY when no task is unfinished; wakes every joiner at zero.
-- join: 1 when nothing is unfinished, else queues the joiner and returns 0.
if redis.call('EXISTS', KEYS[4]) == 0 then
  return redis.error_reply('GONE the queue does not exist')
end
local unfinished = tonumber(redis.call('GET', KEYS[1]) or '0')
if unfinished == nil then
  return redis.error_reply('CORRUPT the unfinished count is not a number')
end
redis.call('EXPIRE', KEYS[4], ARGV[1])
if ARGV[3] == 'join' then
  if unfinished <= 0 then
    return 1
  end
  redis.call('RPUSH', KEYS[2], ARGV[4])
  redis.call('HSET', KEYS[3], ARGV[4], ARGV[5])
  redis.call('EXPIRE', KEYS[2], ARGV[1])
  redis.call('EXPIRE', KEYS[3], ARGV[1])
  return 0
end
if unfinished <= 0 then
  return redis.error_reply('TOOMANY task_done() called more times than items were put')
end
unfinished = redis.call('DECR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[1])
if unfinished == 0 then
  local joiners = redis.call('LRANGE', KEYS[2], 0, -1)
  for _, joiner in ipairs(joiners) do
    local wake = ARGV[2] .. joiner
    redis.call('RPUSH', wake, 1)
    redis.call('EXPIRE', wake, ARGV[1])
  end
  redis.call('DEL', KEYS[2], KEYS[3])
end
return unfinished
