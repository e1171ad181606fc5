-- Gives the chunks of dead or silent pool workers to live ones, atomically.
-- KEYS[1] tasks stream, KEYS[2] results stream, KEYS[3] progress hash, KEYS[4] cancelled calls
-- ARGV[1] consumer group
-- ARGV[2] 'consumer': every chunk pending on consumer ARGV[3] (a worker that exited), which is
--         then removed from the group; 'idle': every chunk pending longer than ARGV[3] ms (its
--         worker stopped renewing the lease)
-- ARGV[4] attempts allowed (1 + retries)
-- ARGV[5] TTL in seconds
-- A chunk entry's header h is 'call.chunk.attempt.first.done' (first: index of its first item in
-- the call's input; done: its items done by earlier attempts, skipped).
-- A chunk is added again from where its progress says it got (done, in the header). When the
-- attempt got further than where it started, the death was not the chunk's doing and it starts
-- again at attempt 1; an attempt without progress counts, and a chunk whose 1 + retries attempts
-- in a row made none is answered in the results stream with a crash entry (field x, offset o =
-- how far it got). Either way the old entry is acked and deleted and its progress
-- removed, so each pending chunk moves exactly once. A chunk of a cancelled call is only removed.
-- The task stream exists here (XPENDING fails with NOGROUP when it or its group is gone: the
-- pool's state was lost); its XADDs still say NOMKSTREAM, as every write to it does, so that
-- none can make it again without its group.
-- Returns {requeued, failed, {consumer...}, {moved...}}: the counts, the consumers whose chunks
-- moved, and each moved chunk as 'call.chunk.attempt.item' (the attempt that ended, and the
-- index in the call's input of the item it had reached).
local pending
if ARGV[2] == 'consumer' then
  pending = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 10000, ARGV[3])
else
  pending = redis.call('XPENDING', KEYS[1], ARGV[1], 'IDLE', ARGV[3], '-', '+', 10000)
end
local requeued, failed = 0, 0
local consumers, seen, moved = {}, {}, {}
for _, p in ipairs(pending) do
  local id, consumer = p[1], p[2]
  local entries = redis.call('XRANGE', KEYS[1], id, id)
  if #entries == 1 then
    local fields = entries[1][2]
    local f = {}
    for i = 1, #fields, 2 do
      f[fields[i]] = fields[i + 1]
    end
    local call, chunk, attempt_s, first, started_s =
      string.match(f['h'] or '', '^(%d+)%.(%d+)%.(%d+)%.(%d+)%.(%d+)$')
    if f['s'] then
      redis.call('XADD', KEYS[1], 'NOMKSTREAM', '*', 's', '1')
    elseif not call then
      -- Not a chunk entry: nothing to move.
    elseif redis.call('SISMEMBER', KEYS[4], call) == 1 then
      -- The call was cancelled: nobody wants this chunk any more.
    else
      local attempt = tonumber(attempt_s)
      local started_at = tonumber(started_s)
      local done = tonumber(redis.call('HGET', KEYS[3], id) or started_at)
      table.insert(moved, call .. '.' .. chunk .. '.' .. attempt_s .. '.'
        .. string.format('%d', tonumber(first) + done))
      local function header(a)
        return call .. '.' .. chunk .. '.' .. a .. '.' .. first .. '.' .. string.format('%d', done)
      end
      if done > started_at then
        -- The worker got further: this death is not the chunk's doing.
        redis.call('XADD', KEYS[1], 'NOMKSTREAM', '*', 'h', header('1'), 'f', f['f'],
          'p', f['p'])
        requeued = requeued + 1
      elseif attempt >= tonumber(ARGV[4]) then
        redis.call('XADD', KEYS[2], '*', 'c', call, 'k', chunk, 'a', attempt_s, 'w', consumer,
          'o', string.format('%d', done),
          'x', 'the worker running it died or stopped renewing its lease')
        failed = failed + 1
      else
        redis.call('XADD', KEYS[1], 'NOMKSTREAM', '*', 'h', header(tostring(attempt + 1)),
          'f', f['f'], 'p', f['p'])
        requeued = requeued + 1
      end
    end
  end
  redis.call('HDEL', KEYS[3], id)
  redis.call('XACK', KEYS[1], ARGV[1], id)
  redis.call('XDEL', KEYS[1], id)
  if not seen[consumer] then
    seen[consumer] = true
    table.insert(consumers, consumer)
  end
end
if ARGV[2] == 'consumer' then
  redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[3])
end
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[5])
return {requeued, failed, consumers, moved}
