-- A host takes an actor: a new lease with a fencing token, and the state to start from.
-- KEYS[1] state hash, KEYS[2] lease, KEYS[3] fencing counter, KEYS[4] activation marker,
-- KEYS[5] mailbox stream
-- ARGV[1] host id, ARGV[2] lease ms, ARGV[3] TTL seconds (the state, the mailbox and the
-- fencing counter get it back: the host's renewals keep them alive from here on)
-- Returns {token, type, data, applied, auth, status, failures, verifier, reason, suspect_until,
-- deaths_entry, deaths}, or {0} when another host holds the lease. Errors: NOACTOR.
-- Host deaths (see "Host deaths" in mod.rs): `held` records that an activation holds the
-- actor and has not released it (a release and a give-back of a clean activation remove it).
-- Found set, with entries in the mailbox after `applied`, the previous holder went without
-- releasing (it died, or its lease lapsed): `suspect_until` is then the mailbox's last entry,
-- and the host runs the messages up to it one per batch, marking each in `running` before it
-- runs it. A `running` entry found not applied is one its host died on: one more death of it
-- (`deaths_entry`, `deaths`). The mark is removed here, whatever the count.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return redis.error_reply('NOACTOR no actor at ' .. KEYS[1])
end
local holder = redis.call('GET', KEYS[2])
if holder and string.sub(holder, 1, string.len(ARGV[1]) + 1) ~= ARGV[1] .. ':' then
  return {0}
end
local token = redis.call('INCR', KEYS[3])
redis.call('EXPIRE', KEYS[3], ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[5], ARGV[3])
local lease = ARGV[1] .. ':' .. token
redis.call('SET', KEYS[2], lease, 'PX', ARGV[2])
redis.call('DEL', KEYS[4])
local s = redis.call('HMGET', KEYS[1], 'type', 'data', 'applied', 'auth', 'status', 'failures',
  'verifier', 'reason', 'held', 'running', 'deaths_entry', 'deaths')
-- `after(a, b)`: stream_ids.lua, prepended to this script.
local applied = s[3]
local suspect_until = ''
if s[9] then
  local newest = redis.call('XREVRANGE', KEYS[5], '+', '-', 'COUNT', 1)
  if newest[1] and after(newest[1][1], applied) then
    suspect_until = newest[1][1]
  end
end
local running, deaths_entry, deaths = s[10], s[11], tonumber(s[12]) or 0
if running and running ~= '' and after(running, applied) then
  if running == deaths_entry then
    deaths = deaths + 1
  else
    deaths_entry, deaths = running, 1
  end
  redis.call('HSET', KEYS[1], 'deaths_entry', deaths_entry, 'deaths', tostring(deaths))
elseif deaths_entry and not after(deaths_entry, applied) then
  -- A count of an entry applied since: nothing to fail.
  redis.call('HDEL', KEYS[1], 'deaths_entry', 'deaths')
  deaths_entry, deaths = false, 0
end
if running then
  redis.call('HDEL', KEYS[1], 'running')
end
redis.call('HSET', KEYS[1], 'held', lease)
return {token, s[1], s[2], s[3], s[4], s[5], s[6], s[7], s[8], suspect_until,
  deaths_entry or '', tostring(deaths)}
