-- Gives the chunks of dead or silent pool workers to live ones, atomically.
-- KEYS[1] tasks stream, KEYS[2] results stream, KEYS[3] progress hash, KEYS[4] cancelled calls,
-- KEYS[5] workers hash (heartbeat stamps '<ms>:<entry id>', and '<worker>/running' fields)
-- ARGV[1] consumer group
-- ARGV[2] 'consumer': every chunk pending on consumer ARGV[3] (a worker that exited), which is
--         then removed from the group; 'idle': every chunk pending longer than ARGV[3] ms (its
--         worker stopped renewing the lease)
-- ARGV[4] attempts allowed (1 + retries)
-- ARGV[5] TTL in seconds
-- ARGV[6] 'blame': the chunk each worker was running is charged with its death (see below);
--         'none': no chunk is (the supervisor killed the worker for a cancelled chunk, which a
--         cancel sweep removed already)
-- A chunk entry's header h is 'call.chunk.attempt.first.done' with an optional '.1' at the end
-- (first: index of its first item in the call's input; done: its items done by earlier
-- attempts, skipped; '.1': careful, see below).
--
-- Which chunk is charged. A worker holds the chunks of one read (up to 64), runs them in order
-- (the order of their ids) and sends their outcomes together after the last: at its death, those
-- before the one it ran are done but unreported, those after it never started. Only the one it
-- ran is charged, when it is known:
-- * the worker's field '<worker>/running' names one of its pending chunks: that one. A worker
--   writes it before each chunk of a careful read (one holding a careful chunk), so it is exact
--   then; a read that is not careful leaves it alone.
-- * its read was careful but that field names none of them: none (it died before the first).
-- * it held one chunk: that one (as a worker with chunks that take 2 ms or more always does).
-- * its heartbeat stamp names its last pending chunk: that one (nothing started after it).
-- * otherwise it is not known (the stamp is written every third of a lease, so a worker that
--   dies within microseconds of starting a chunk has a stamp that names an older one): none is
--   charged, and the chunks that may have been running (from the one its stamp names on, or all)
--   are added again careful, so that the next worker that reads them names each chunk before it
--   runs it, and a second death is charged to the right one. So a chunk that always kills its
--   worker still fails after 1 + retries charged attempts; a chunk read with many others may
--   cost one death more than that.
-- The others are added again with their attempt unchanged: a death charges one chunk at most.
-- A chunk that finished but whose outcome was not sent yet runs again (at least once).
--
-- A charged chunk is added again from where its progress says it got (done, in the header).
-- When the attempt got further than where it started, the death was not the chunk's doing and
-- it starts again at attempt 1; an attempt without progress counts, and a chunk whose
-- 1 + retries attempts in a row made none is answered in the results stream with a crash entry
-- (field x, offset o = how far it got). Either way the old entry is acked and deleted and its
-- progress removed, so each pending chunk moves exactly once. A chunk of a cancelled call is
-- only removed.
-- The task stream exists here (XPENDING fails with NOGROUP when it or its group is gone: the
-- pool's state was lost); its XADDs still say NOMKSTREAM, as every write to it does, so that
-- none can make it again without its group.
-- Returns {requeued, failed, {consumer...}, {charged...}}: the counts, the consumers whose chunks
-- moved, and each charged chunk as 'call.chunk.attempt.item' (the attempt that ended, and the
-- index in the call's input of the item it had reached).
local pending
if ARGV[2] == 'consumer' then
  pending = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 10000, ARGV[3])
else
  pending = redis.call('XPENDING', KEYS[1], ARGV[1], 'IDLE', ARGV[3], '-', '+', 10000)
end

-- The pending entries of each consumer, in order (XPENDING lists them by id).
local consumers, held = {}, {}
for _, p in ipairs(pending) do
  local id, consumer = p[1], p[2]
  if not held[consumer] then
    held[consumer] = {}
    table.insert(consumers, consumer)
  end
  local e = { id = id }
  local entries = redis.call('XRANGE', KEYS[1], id, id)
  if #entries == 1 then
    local fields = entries[1][2]
    local f = {}
    for i = 1, #fields, 2 do
      f[fields[i]] = fields[i + 1]
    end
    e.f = f
    if f['s'] then
      e.stop = true
    else
      local call, chunk, attempt_s, first, started_s, rest =
        string.match(f['h'] or '', '^(%d+)%.(%d+)%.(%d+)%.(%d+)%.(%d+)(.*)$')
      if call and (rest == '' or rest == '.0' or rest == '.1') then
        e.call, e.chunk, e.attempt_s, e.first, e.started_s = call, chunk, attempt_s, first,
          started_s
        e.careful = rest == '.1'
      end
    end
  end
  table.insert(held[consumer], e)
end

-- The chunk `consumer` was running (its id), or nil; and, when that is not known, the position
-- in `chunks` of the first chunk that may have been.
local function culprit(consumer, chunks)
  if ARGV[6] ~= 'blame' or #chunks == 0 then
    return nil, nil
  end
  local position = {}
  local careful = false
  for i, e in ipairs(chunks) do
    position[e.id] = i
    careful = careful or e.careful
  end
  local exact = redis.call('HGET', KEYS[5], consumer .. '/running')
  if exact and position[exact] then
    return exact, nil
  end
  if careful then
    return nil, nil
  end
  if #chunks == 1 then
    return chunks[1].id, nil
  end
  local stamp = redis.call('HGET', KEYS[5], consumer)
  local running = stamp and string.match(stamp, '^%d+:(.+)$')
  if running and position[running] == #chunks then
    return running, nil
  end
  return nil, (running and position[running]) or 1
end

local requeued, failed = 0, 0
local moved = {}
for _, consumer in ipairs(consumers) do
  local chunks = {}
  for _, e in ipairs(held[consumer]) do
    if e.call then
      table.insert(chunks, e)
    end
  end
  local charged, suspects_from = culprit(consumer, chunks)
  local suspect = {}
  if suspects_from then
    for i = suspects_from, #chunks do
      suspect[chunks[i].id] = true
    end
  end
  for _, e in ipairs(held[consumer]) do
    local id = e.id
    if e.stop then
      redis.call('XADD', KEYS[1], 'NOMKSTREAM', '*', 's', '1')
    elseif not e.call then
      -- Not a chunk entry (or deleted meanwhile): nothing to move.
    elseif redis.call('SISMEMBER', KEYS[4], e.call) == 1 then
      -- The call was cancelled: nobody wants this chunk any more.
    else
      local f = e.f
      local attempt = tonumber(e.attempt_s)
      local started_at = tonumber(e.started_s)
      local done = tonumber(redis.call('HGET', KEYS[3], id) or started_at)
      local blamed = id == charged
      local careful = e.careful or blamed or suspect[id]
      local function header(a)
        return e.call .. '.' .. e.chunk .. '.' .. a .. '.' .. e.first .. '.'
          .. string.format('%d', done) .. (careful and '.1' or '')
      end
      if blamed then
        table.insert(moved, e.call .. '.' .. e.chunk .. '.' .. e.attempt_s .. '.'
          .. string.format('%d', tonumber(e.first) + done))
      end
      if done > started_at then
        -- The worker got further: this death is not the chunk's doing.
        redis.call('XADD', KEYS[1], 'NOMKSTREAM', '*', 'h', header('1'), 'f', f['f'],
          'p', f['p'])
        requeued = requeued + 1
      elseif not blamed then
        redis.call('XADD', KEYS[1], 'NOMKSTREAM', '*', 'h', header(e.attempt_s), 'f', f['f'],
          'p', f['p'])
        requeued = requeued + 1
      elseif attempt >= tonumber(ARGV[4]) then
        redis.call('XADD', KEYS[2], '*', 'c', e.call, 'k', e.chunk, 'a', e.attempt_s,
          'w', consumer, 'o', string.format('%d', done),
          'x', 'the worker running it died or stopped renewing its lease')
        failed = failed + 1
      else
        redis.call('XADD', KEYS[1], 'NOMKSTREAM', '*', 'h', header(tostring(attempt + 1)),
          'f', f['f'], 'p', f['p'])
        requeued = requeued + 1
      end
    end
    redis.call('HDEL', KEYS[3], id)
    redis.call('XACK', KEYS[1], ARGV[1], id)
    redis.call('XDEL', KEYS[1], id)
  end
end
if ARGV[2] == 'consumer' then
  redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[3])
  redis.call('HDEL', KEYS[5], ARGV[3] .. '/running')
end
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[5])
return {requeued, failed, consumers, moved}
