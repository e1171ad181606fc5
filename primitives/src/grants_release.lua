-- Release one grant.
-- ARGV[5] holder, ARGV[6] kind, ARGV[7] the caller's grant id ('' when it holds none).
-- Lock: the caller's grant, or (Python allows it) whoever's grant exists. RLock: only the
-- owner's, one recursion level at a time. Semaphore: the caller's grant, else the oldest grant,
-- else a plain increment (a semaphore used as a signal). BoundedSemaphore: the same, but never
-- above its bound.
-- Returns {1, recursion count left}, or {0} when the caller's grant had lapsed and its permit was
-- already given back (semaphores). Errors: LOST (lock or rlock whose lease lapsed), UNLOCKED,
-- NOTOWNER, TOOMANY.
local holder, kind, mine = ARGV[5], ARGV[6], ARGV[7]
reclaim()
local target = nil
local target_record = nil
if mine ~= '' then
  target_record = redis.call('HGET', KEYS[2], mine)
  if target_record then
    target = mine
  elseif kind == 'lock' or kind == 'rlock' then
    save()
    return redis.error_reply('LOST the lease of this hold lapsed')
  else
    save()
    return {0}
  end
else
  local all = redis.call('HGETALL', KEYS[2])
  local oldest = nil
  for i = 1, #all, 2 do
    if all[i] ~= '_' then
      local owner = parse_grant(all[i + 1])
      if owner == holder and (target == nil or tonumber(all[i]) < tonumber(target)) then
        target = all[i]
      end
      if oldest == nil or tonumber(all[i]) < tonumber(oldest) then
        oldest = all[i]
      end
    end
  end
  if kind == 'rlock' then
    if target == nil then
      save()
      return redis.error_reply(oldest and 'NOTOWNER held by another owner' or 'UNLOCKED not held')
    end
  elseif target == nil then
    target = oldest
  end
  if target == nil and kind == 'lock' then
    save()
    return redis.error_reply('UNLOCKED not held')
  end
end
if target ~= nil then
  local owner, expiry, count = parse_grant(target_record or redis.call('HGET', KEYS[2], target))
  if kind == 'rlock' and owner ~= holder then
    save()
    return redis.error_reply('NOTOWNER held by another owner')
  end
  if kind == 'rlock' and count > 1 then
    redis.call('HSET', KEYS[2], target, owner .. '|' .. (now + lease) .. '|' .. (count - 1))
    note_expiry(now + lease)
    save()
    return {1, count - 1}
  end
  redis.call('HDEL', KEYS[2], target)
elseif bound >= 0 and value >= bound then
  save()
  return redis.error_reply('TOOMANY released too many times')
end
value = value + 1
dirty = true
if bound >= 0 and value > bound then
  save()
  return redis.error_reply('TOOMANY released too many times')
end
grant_waiters()
save()
return {1, 0}
