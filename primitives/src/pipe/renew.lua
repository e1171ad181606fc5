-- A process's heartbeat: renews the holds it has on this pipe (its copies of the ends and the
-- transfers it sent and nobody claimed yet), reaps lapsed holds, refreshes every key's TTL.
-- ARGV[3] the new lease expiry (ms), ARGV[4...] pairs: end, holder.
-- Returns {1 when the pipe exists, then "<end>:<holder>" for each hold that is gone (claimed,
-- lapsed, or its end closed)}.
if not exists() then
  return { 0 }
end
local expiry = tonumber(ARGV[3])
local result = { 1 }
for i = 4, #ARGV, 2 do
  local e = tonumber(ARGV[i])
  if not is_closed(e) and redis.call('HEXISTS', holders[e + 1], ARGV[i + 1]) == 1 then
    redis.call('HSET', holders[e + 1], ARGV[i + 1], expiry)
  else
    table.insert(result, ARGV[i] .. ':' .. ARGV[i + 1])
  end
end
reap()
for i = 1, 5 do
  redis.call('EXPIRE', KEYS[i], ttl)
end
return result
