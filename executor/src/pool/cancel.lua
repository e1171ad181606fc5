-- Cancels a pool call: its chunks that no worker took yet are removed, and workers see the
-- call in the cancelled set (their heartbeat checks it, and the task's termination_requested()
-- becomes true). With ARGV[3] = 'sweep', the chunks of the call still pending whose worker runs
-- them (it did not stop within the grace period) are removed too and their workers returned,
-- to be killed. A worker runs the chunk its heartbeat stamp names ('<ms>:<entry id>' in the
-- workers hash); one whose stamp names another chunk holds this one behind it, in the same
-- read, and skips it when it gets there (it knows the call is cancelled): that chunk is left
-- pending and counted as deferred, for a later sweep. A worker without a stamp (gone) or with
-- one that names no entry in the old form is treated as running it.
-- A chunk entry's header h starts with its call: 'call.chunk.attempt.first.done'.
-- KEYS[1] tasks stream, KEYS[2] cancelled set, KEYS[3] workers hash
-- ARGV[1] call, ARGV[2] TTL seconds, ARGV[3] 'cancel' or 'sweep', ARGV[4] consumer group
-- Returns {removed, deferred, consumer...}.
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[2])
local removed, deferred = 0, 0
local consumers, seen, stamps = {}, {}, {}
if ARGV[3] == 'cancel' then
  local last = '0-0'
  local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', KEYS[1])
  if ok then
    for _, g in ipairs(groups) do
      local info = {}
      for i = 1, #g, 2 do
        info[g[i]] = g[i + 1]
      end
      if info['name'] == ARGV[4] then
        last = info['last-delivered-id']
      end
    end
  end
  local undelivered = redis.call('XRANGE', KEYS[1], '(' .. last, '+')
  for _, e in ipairs(undelivered) do
    local fields = e[2]
    for i = 1, #fields, 2 do
      if fields[i] == 'h' and string.match(fields[i + 1], '^(%d+)%.') == ARGV[1] then
        redis.call('XDEL', KEYS[1], e[1])
        removed = removed + 1
      end
    end
  end
else
  local pending = redis.call('XPENDING', KEYS[1], ARGV[4], '-', '+', 10000)
  for _, p in ipairs(pending) do
    local entries = redis.call('XRANGE', KEYS[1], p[1], p[1])
    if #entries == 1 then
      local fields = entries[1][2]
      for i = 1, #fields, 2 do
        if fields[i] == 'h' and string.match(fields[i + 1], '^(%d+)%.') == ARGV[1] then
          if stamps[p[2]] == nil then
            stamps[p[2]] = redis.call('HGET', KEYS[3], p[2])
          end
          local running = stamps[p[2]] and string.match(stamps[p[2]], '^%d+:(.*)$')
          if running ~= nil and running ~= p[1] then
            deferred = deferred + 1
          else
            redis.call('XACK', KEYS[1], ARGV[4], p[1])
            redis.call('XDEL', KEYS[1], p[1])
            removed = removed + 1
            if not seen[p[2]] then
              seen[p[2]] = true
              table.insert(consumers, p[2])
            end
          end
        end
      end
    end
  end
end
return {removed, deferred, unpack(consumers)}
