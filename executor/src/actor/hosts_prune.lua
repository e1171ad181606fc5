-- Deletes the consumers of the hosts' group that hold no request and have been idle for a
-- while (`idle` of XINFO CONSUMERS: since Redis last handed them requests; since their last
-- read attempt from Redis 7.2 on): hosts that are gone without being retired (killed with
-- their runtime, say), and live hosts that got no request lately. A live one loses nothing,
-- holding nothing: Redis makes it again when it next hands it a request (a consumer deleted
-- while it waits in XREADGROUP is made again as well).
-- KEYS[1] activations stream
-- ARGV[1] group, ARGV[2] idle ms past which a consumer is gone, ARGV[3] the caller's consumer
-- (kept)
-- Returns how many consumers were deleted.
local consumers = redis.pcall('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
if type(consumers) ~= 'table' or consumers['err'] then
  return 0
end
local idle_limit = tonumber(ARGV[2])
local removed = 0
for _, c in ipairs(consumers) do
  local f = {}
  for i = 1, #c - 1, 2 do
    f[c[i]] = c[i + 1]
  end
  if f['name'] and f['name'] ~= ARGV[3] and tonumber(f['pending']) == 0 and
     (tonumber(f['idle']) or 0) > idle_limit then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], f['name'])
    removed = removed + 1
  end
end
return removed
