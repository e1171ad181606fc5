-- Adds a batch of chunks of one call to the task stream (attempt 1 each), unless the call was
-- cancelled. The check and the writes are one atomic step: a cancel runs either before it (its
-- call is in the cancelled set, and nothing is added) or after it (the chunks are in the
-- stream, where cancel.lua removes those not delivered yet). So a chunk written after its
-- call's cancel never reaches a worker, whatever the feeder saw of the cancel before it sent.
-- Like a MULTI/EXEC, the script wakes a worker blocked in XREADGROUP once for the whole batch.
--
-- At most once: the script records, per call, the index of the last chunk it added (in the
-- `added` hash, field = call), and adds only the chunks past it. A call's chunks are written in
-- order of their index, one batch after the other, by one writer that sends a batch again only
-- when it got no reply (the first may have run: a dropped connection, a timeout): that retry
-- finds its chunks recorded and adds nothing, instead of adding them twice (each would run).
-- A record needs to outlive the writer's retries only: it is kept for ARGV[6] seconds at least
-- and twice that at most, through two generations of the hash. `added` is made with a TTL of
-- twice ARGV[6]; once it has half of that left, the next batch moves it to `added_old` (whose
-- TTL runs on, under ARGV[6]) and starts a new one. A record is looked up in both. So the
-- records of a long-lived pool are those of its calls of the last ARGV[6] to 2 * ARGV[6]
-- seconds, not of every call it ever had; a stale record is harmless (it names a chunk the
-- call added already, and its later batches start past it).
--
-- KEYS[1] tasks stream, KEYS[2] cancelled set, KEYS[3] results stream, KEYS[4] added hash (this
-- generation), KEYS[5] added_old hash (the one before)
-- ARGV[1] call, ARGV[2] TTL seconds to give both streams, or 0 to leave them, ARGV[3] function,
-- ARGV[4] index of the batch's first chunk, ARGV[5] of its last (the batch's indices follow
-- each other), ARGV[6] how long (seconds) a record is kept at least, then two per chunk: its
-- header h ('call.chunk.1.first.0') and its items p.
-- Returns the number of chunks added now (0 when the whole batch was added before: a retry);
-- -1 when the call is cancelled (none added); nil when the task stream is gone (none added: the
-- pool's state was lost, and the stream must not be made again without its consumer group,
-- where no worker could read the chunks).
if redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 1 then
  return -1
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  return false
end
local keep = tonumber(ARGV[6])
-- This generation of records, rotated once it is older than `keep`.
local left = redis.call('PTTL', KEYS[4])
if left ~= -2 and left <= keep * 1000 then
  -- UNLINK: a large old generation is freed off the main thread.
  redis.call('UNLINK', KEYS[5])
  if pcall(redis.call, 'RENAME', KEYS[4], KEYS[5]) and left == -1 then
    -- A hash without a TTL (none of ours) is kept no longer than a generation.
    redis.call('EXPIRE', KEYS[5], keep)
  end
  left = -2
end
local done = tonumber(redis.call('HGET', KEYS[4], ARGV[1])
  or redis.call('HGET', KEYS[5], ARGV[1]) or -1)
local first = tonumber(ARGV[4])
-- The chunks of this batch that are recorded already (all of them, for a retry) are skipped.
local start = 7
if done >= first then
  start = start + 2 * (done - first + 1)
end
local added = 0
for i = start, #ARGV, 2 do
  redis.call('XADD', KEYS[1], 'NOMKSTREAM', '*', 'h', ARGV[i], 'f', ARGV[3], 'p', ARGV[i + 1])
  added = added + 1
end
if added > 0 then
  redis.call('HSET', KEYS[4], ARGV[1], ARGV[5])
  if left == -2 then
    redis.call('EXPIRE', KEYS[4], 2 * keep)
  end
end
if tonumber(ARGV[2]) > 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  redis.call('EXPIRE', KEYS[3], ARGV[2])
end
return added
