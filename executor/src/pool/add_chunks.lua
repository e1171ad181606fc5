-- Adds a batch of chunks of one call to the task stream (attempt 1 each), unless the call was
-- cancelled. The check and the writes are one atomic step: a cancel runs either before it (its
-- call is in the cancelled set, and nothing is added) or after it (the chunks are in the
-- stream, where cancel.lua removes those not delivered yet). So a chunk written after its
-- call's cancel never reaches a worker, whatever the feeder saw of the cancel before it sent.
-- Like a MULTI/EXEC, the script wakes a worker blocked in XREADGROUP once for the whole batch.
-- KEYS[1] tasks stream, KEYS[2] cancelled set, KEYS[3] results stream
-- ARGV[1] call, ARGV[2] TTL seconds to give both streams, or 0 to leave them, ARGV[3] function,
-- then two per chunk: its header h ('call.chunk.1.first.0') and its items p.
-- Returns the number of chunks added; -1 when the call is cancelled (none added); nil when the
-- task stream is gone (none added: the pool's state was lost, and the stream must not be made
-- again without its consumer group, where no worker could read the chunks).
if redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 1 then
  return -1
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  return false
end
local added = 0
for i = 4, #ARGV, 2 do
  redis.call('XADD', KEYS[1], 'NOMKSTREAM', '*', 'h', ARGV[i], 'f', ARGV[3], 'p', ARGV[i + 1])
  added = added + 1
end
if tonumber(ARGV[2]) > 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  redis.call('EXPIRE', KEYS[3], ARGV[2])
end
return added
