-- Shared by the pipe scripts. Keys of one pipe, all under one hash tag:
--   KEYS[1] state hash      duplex (0/1), closed:0 and closed:1 ('1' once every holder of that
--                           end let go), refreshed (ms, last TTL refresh by a send), reap_at (ms:
--                           no hold lapses before it)
--   KEYS[2] holders:0 hash  holder -> lease expiry (ms): the processes holding end 0 and the
--   KEYS[3] holders:1 hash  transfers of it in flight (likewise for end 1)
--   KEYS[4] inbox:0 list    messages to end 0 (0x00 + payload), '' for end of file
--   KEYS[5] inbox:1 list    messages to end 1
-- ARGV[1] now (ms), ARGV[2] TTL (s); each script's own arguments follow.
local now = tonumber(ARGV[1])
local ttl = ARGV[2]
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

-- Removes holds whose lease lapsed (a holder that died) and finishes an end left without
-- holders; only once the earliest lease may have lapsed. `reap_at`: the state's field, when the
-- caller read it already.
local function reap(reap_at)
  if reap_at == nil then
    reap_at = redis.call('HGET', KEYS[1], 'reap_at')
  end
  if now < (tonumber(reap_at) or 0) then
    return false
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

-- Records a hold of end e until `expiry`.
local function hold(e, holder, expiry)
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
