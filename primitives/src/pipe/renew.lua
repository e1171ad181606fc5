-- A process's heartbeat: renews the holds it has on this pipe (its copies of the ends and the
-- transfers it sent and nobody claimed yet) for a lease from now, reaps lapsed holds and makes
-- reap_at the earliest expiry again (so that sends keep to their one round trip), refreshes
-- every key's TTL.
-- ARGV[3...] pairs: end, holder.
-- Returns {1 when the pipe exists, then "<end>:<holder>" for each hold that is gone (claimed,
-- lapsed, or its end closed)}.
if not exists() then
  return { 0 }
end
-- After an outage, the holds move forward first: this process's are renewed, not lapsed.
resume()
local expiry = now + lease
local result = { 1 }
for i = 3, #ARGV, 2 do
  local e = tonumber(ARGV[i])
  -- A hold that lapsed and was not reaped yet is renewed all the same: its holder lives.
  if not is_closed(e) and redis.call('HEXISTS', holders[e + 1], ARGV[i + 1]) == 1 then
    redis.call('HSET', holders[e + 1], ARGV[i + 1], expiry)
  else
    table.insert(result, ARGV[i] .. ':' .. ARGV[i + 1])
  end
end
reap(nil, true)
for i = 1, 5 do
  redis.call('EXPIRE', KEYS[i], ttl)
end
return result
