-- Trims a pool's task stream: removes the chunk entries the workers are done with. Workers only
-- acknowledge the entries they ran (XACK), which is cheap; deleting them one by one (XDEL) would
-- cost the server a walk through the stream node of each. An entry is done when it was delivered
-- (its id is at most the group's last-delivered-id) and is no longer pending (its id is below the
-- smallest pending one): everything below that threshold goes, in one XTRIM MINID.
-- KEYS[1] tasks stream
-- ARGV[1] consumer group
-- Returns the number of entries removed.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', KEYS[1])
if not ok then
  return 0
end
local last = nil
for _, g in ipairs(groups) do
  local info = {}
  for i = 1, #g, 2 do
    info[g[i]] = g[i + 1]
  end
  if info['name'] == ARGV[1] then
    last = info['last-delivered-id']
  end
end
if not last then
  return 0
end
local ms, seq = string.match(last, '^(%d+)-(%d+)$')
if not ms then
  return 0
end
-- The first id after the last delivered one.
local threshold = ms .. '-' .. string.format('%d', tonumber(seq) + 1)
local pending = redis.call('XPENDING', KEYS[1], ARGV[1])
if pending[1] > 0 then
  threshold = pending[2]
end
return redis.call('XTRIM', KEYS[1], 'MINID', threshold)
