-- Shared by the claim scripts of a queue (batched gets; see claims/mod.rs).
-- KEYS[1] items list, KEYS[2] state hash, KEYS[3] claims hash: holder -> hold deadline (ms,
-- Redis's clock). A holder's claim is the sorted set <claim prefix><holder> (same hash tag):
-- score = the item's number in the holder's sequence, member = "<number>:<payload>"; the list
-- <claim prefix><holder>:in holds what a waiting get's BLMOVE took and its fetch did not claim
-- yet.
-- Cost: every redis.call costs 1.5-2 us, so the claims hash is read once per script.

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Puts every item of `holder`'s claim back at the head of the queue, in their order (what its
-- BLMOVE took after what it claimed), and deletes the claim. Returns how many went back.
local function give_back(claim_prefix, holder)
  local key = claim_prefix .. holder
  local landed = 0
  while redis.call('LMOVE', key .. ':in', KEYS[1], 'RIGHT', 'LEFT') do
    landed = landed + 1
  end
  local members = redis.call('ZRANGE', key, 0, -1)
  local n = #members
  if n == 0 then
    return landed
  end
  -- LPUSH puts its last argument first: push the items last to first.
  local items = {}
  for i = n, 1, -1 do
    local member = members[i]
    local colon = string.find(member, ':', 1, true)
    if colon then
      items[#items + 1] = string.sub(member, colon + 1)
    else
      -- Not written by claim_fetch.lua: logged and dropped with the claim, not pushed as an item.
      redis.log(redis.LOG_WARNING, 'shoal: ' .. key .. ' holds a member without a number')
    end
  end
  -- unpack() of too many values overflows Lua's stack: push in slices, the later items first.
  for first = 1, #items, 1000 do
    redis.call('LPUSH', KEYS[1], unpack(items, first, math.min(first + 999, #items)))
  end
  redis.call('DEL', key)
  return landed + #items
end

-- Gives back the claims of other holders whose hold lapsed (they died, or stopped returning
-- items and did not give them back). Returns whether another holder's hold is still running.
local function reap(claim_prefix, now, me)
  local others = false
  local holds = redis.call('HGETALL', KEYS[3])
  for i = 1, #holds, 2 do
    local holder = holds[i]
    if holder ~= me then
      if (tonumber(holds[i + 1]) or 0) < now then
        give_back(claim_prefix, holder)
        redis.call('HDEL', KEYS[3], holder)
      else
        others = true
      end
    end
  end
  return others
end
