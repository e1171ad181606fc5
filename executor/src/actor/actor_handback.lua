-- A host gives back an activation it cannot serve (the actor's type is not in its program, or
-- the actor was created under another authkey): the lease goes, and the give-back is counted
-- in the actor's current run of give-backs (`handbacks`, from `handback_since` to
-- `handback_last`, Unix ms by Redis's clock). A run ends with a commit (a host of the actor's
-- own program served it: the commit sets the count to 0), or when no give-back came for a
-- window: the next give-back starts a new run. The actor is failed with the host's reason
-- only when its run holds at least the limit of give-backs AND has lasted the window: its
-- senders get that error rather than waiting for a host that never comes, while a brief
-- absence of the hosts of its own program (a restart), however many give-backs it makes,
-- fails nothing.
-- An actor whose mailbox holds no message it has not applied (its host exited, and its
-- actors were put up for activation all the same) needs no host: the give-back is not
-- counted, and nobody asks for another host ('idle'): its next message does.
-- KEYS[1] state hash, KEYS[2] lease, KEYS[3] mailbox stream
-- ARGV[1] lease value (host:token), ARGV[2] the limit, ARGV[3] the reason, ARGV[4] the window
-- (ms), ARGV[5] '1' when the activation found the actor suspect (its previous holder went
-- without releasing it, messages waiting: see actor_activate.lua): its `held` mark stays, so
-- that the host that serves it next runs them one by one; otherwise the mark goes (this host
-- ran nothing)
-- Returns 'again' (ask for another host), 'later' (the same, after a pause: the run is past
-- the limit, and waits out the window), 'failed' (the actor was failed), 'idle' (no message
-- waits: ask for nothing) or 'lost' (the lease was not the caller's any more, or the actor is
-- gone).
if redis.call('GET', KEYS[2]) ~= ARGV[1] then
  return 'lost'
end
redis.call('DEL', KEYS[2])
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 'lost'
end
if ARGV[5] ~= '1' then
  redis.call('HDEL', KEYS[1], 'held')
end
-- `after(a, b)`: stream_ids.lua, prepended to this script.
local newest = redis.call('XREVRANGE', KEYS[3], '+', '-', 'COUNT', 1)
if not newest[1] or not after(newest[1][1], redis.call('HGET', KEYS[1], 'applied')) then
  return 'idle'
end
-- Unix ms as text (a Lua number of that size may be written in exponent form).
local t = redis.call('TIME')
local now_ms = t[1] .. string.format('%03d', math.floor(tonumber(t[2]) / 1000))
local now = tonumber(now_ms)
local window = tonumber(ARGV[4])
local s = redis.call('HMGET', KEYS[1], 'handbacks', 'handback_since', 'handback_last', 'status')
local n = tonumber(s[1]) or 0
local since_ms = s[2]
local last = tonumber(s[3])
if n == 0 or not tonumber(since_ms) or not last or now - last > window then
  n = 0
  since_ms = now_ms
end
local since = tonumber(since_ms)
n = n + 1
redis.call('HSET', KEYS[1], 'handbacks', tostring(n), 'handback_since', since_ms,
  'handback_last', now_ms)
if n < tonumber(ARGV[2]) then
  return 'again'
end
if now - since < window then
  return 'later'
end
if s[4] == 'active' then
  redis.call('HSET', KEYS[1], 'status', 'failed', 'reason', ARGV[3])
  return 'failed'
end
-- Not failed (a state of old, without a status): passed around, at the paced rate.
return 'later'
