-- Shared by the pipe scripts. Keys of one pipe, all under one hash tag:
--   KEYS[1] state hash      duplex (0/1), closed:0 and closed:1 ('1' once every holder of that
--                           end let go), refreshed (ms, last TTL refresh by a send), reap_at (ms:
--                           no hold lapses before it), ran (ms, when a script of this prelude
--                           last ran on the pipe)
--   KEYS[2] holders:0 hash  holder -> lease expiry (ms): the processes holding end 0 and the
--   KEYS[3] holders:1 hash  transfers of it in flight (likewise for end 1)
--   KEYS[4] inbox:0 list    messages to end 0 (0x00 + payload), '' for end of file
--   KEYS[5] inbox:1 list    messages to end 1
-- ARGV[1] the lease (ms), ARGV[2] TTL (s); each script's own arguments follow.
-- Every time is Redis's clock (TIME), never a client's: a hold taken or renewed now lapses at
-- now + lease.
local lease = tonumber(ARGV[1])
local ttl = ARGV[2]
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local holders = { KEYS[2], KEYS[3] }
local inbox = { KEYS[4], KEYS[5] }

local function exists()
  return redis.call('EXISTS', KEYS[1]) == 1
end

local function is_closed(e)
  return redis.call('HGET', KEYS[1], 'closed:' .. e) == '1'
end

-- Every holder of end e let go: the other end's readers get end of file after what was sent, and
-- what was sent to e can never be read.
local function finish(e)
  redis.call('HSET', KEYS[1], 'closed:' .. e, 1)
  redis.call('DEL', holders[e + 1], inbox[e + 1])
  if e == 1 or redis.call('HGET', KEYS[1], 'duplex') == '1' then
    local other = inbox[2 - e]
    redis.call('RPUSH', other, '')
    redis.call('EXPIRE', other, ttl)
  end
end

-- Called first by every script that may reap: when no script ran on the pipe for over half a
-- lease, Redis was out of reach (down, paused, cut off) for everyone, since every live holder's
-- heartbeat runs renew.lua every third of a lease: the holds could not be renewed meanwhile, and
-- the gap does not count against them. Every hold's expiry (and reap_at) moves forward by the
-- gap, so the live holders have what was left of their lease to renew, and a holder that died
-- lapses about a lease after Redis is back at the latest. `ran`: the state's field, when the
-- caller read it already. Returns whether the holds moved.
local function resume(ran)
  if ran == nil then
    ran = redis.call('HGET', KEYS[1], 'ran')
  end
  ran = tonumber(ran)
  redis.call('HSET', KEYS[1], 'ran', now)
  if ran == nil or now - ran <= lease / 2 then
    return false
  end
  local gap = now - ran
  for e = 0, 1 do
    local h = redis.call('HGETALL', holders[e + 1])
    for i = 1, #h, 2 do
      redis.call('HSET', holders[e + 1], h[i], (tonumber(h[i + 1]) or 0) + gap)
    end
  end
  local reap_at = tonumber(redis.call('HGET', KEYS[1], 'reap_at'))
  if reap_at ~= nil then
    redis.call('HSET', KEYS[1], 'reap_at', reap_at + gap)
  end
  return true
end

-- Removes holds whose lease lapsed (a holder that died) and finishes an end left without
-- holders; only once the earliest lease may have lapsed, unless `force`d (which also makes
-- reap_at the earliest expiry again). `reap_at`: the state's field, when the caller read it
-- already.
local function reap(reap_at, force)
  if not force then
    if reap_at == nil then
      reap_at = redis.call('HGET', KEYS[1], 'reap_at')
    end
    if now < (tonumber(reap_at) or 0) then
      return false
    end
  end
  local earliest = nil
  for e = 0, 1 do
    if not is_closed(e) then
      local h = redis.call('HGETALL', holders[e + 1])
      local live = 0
      for i = 1, #h, 2 do
        local expiry = tonumber(h[i + 1]) or 0
        if expiry < now then
          redis.call('HDEL', holders[e + 1], h[i])
        else
          live = live + 1
          if earliest == nil or expiry < earliest then
            earliest = expiry
          end
        end
      end
      if live == 0 then
        finish(e)
      end
    end
  end
  redis.call('HSET', KEYS[1], 'reap_at', earliest or (now + 86400000))
  return true
end

-- Records a hold of end e for a lease from now.
local function hold(e, holder)
  local expiry = now + lease
  redis.call('HSET', holders[e + 1], holder, expiry)
  redis.call('EXPIRE', holders[e + 1], ttl)
  local reap_at = tonumber(redis.call('HGET', KEYS[1], 'reap_at') or '0')
  if expiry < reap_at then
    redis.call('HSET', KEYS[1], 'reap_at', expiry)
  end
end

-- Removes a hold of end e; finishes the end when it was the last.
local function let_go(e, holder)
  if redis.call('HDEL', holders[e + 1], holder) == 1 and not is_closed(e)
      and redis.call('HLEN', holders[e + 1]) == 0 then
    finish(e)
  end
end
