-- Release one grant.
-- ARGV[5] holder, ARGV[6] kind, ARGV[7] the caller's grant id ('' when it holds none).
-- A named grant is released or the release fails (LOST, or {0} for a semaphore): it never falls
-- back to another grant. The '' form serves `release()` called by a process that holds nothing
-- (a Lock held elsewhere, a Semaphore used as a counter); a guard, an undo or a dropped call
-- always names its grant, and sends nothing once its grant is gone.
-- Lock: the caller's grant, or (Python allows it) whoever's grant exists. RLock: only the
-- owner's, one recursion level at a time, and only the grant its process names: a grant of the
-- holder that its process no longer counts (its last level's release is on its way: see
-- grants_acquire.lua) is not the holder's hold any more, so the '' form never takes a level off
-- it. Semaphore and BoundedSemaphore: the caller's grant, or, when it holds none, a plain
-- increment (a semaphore is a counter, also used as a signal between processes); it never takes
-- another process's grant.
-- Repeats: a release is not conditional, so one applied twice (a timed-out attempt that reached
-- Redis after its repeat) takes two levels off an RLock grant. The caller repeats only the
-- release of a grant's last level (or a Lock's or a semaphore's grant), which its process no
-- longer counts and which its owner never re-enters (grants_acquire.lua): the second one takes
-- a level nobody holds, or finds the grant gone (LOST), never a level its owner believes it
-- holds. A level above the last is sent once.
-- A release that would raise a BoundedSemaphore's free permits above its bound is TOOMANY
-- (Python's ValueError); the caller's grant, if any, ends all the same (its hold is over, as
-- Python's counter does not remember it).
-- Returns {1, recursion count left}, or {0} when the caller's grant had lapsed and its permit was
-- already given back (semaphores). Errors: LOST (lock or rlock whose grant is gone: its lease
-- lapsed, or another process released the lock), UNLOCKED, NOTOWNER, TOOMANY.
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
elseif kind == 'lock' or kind == 'rlock' then
  local all = redis.call('HGETALL', KEYS[2])
  local oldest = nil
  local others = false
  for i = 1, #all, 2 do
    if all[i] ~= '_' then
      local owner = parse_grant(all[i + 1])
      if owner == holder and (target == nil or tonumber(all[i]) < tonumber(target)) then
        target = all[i]
      end
      if owner ~= holder then
        others = true
      end
      if oldest == nil or tonumber(all[i]) < tonumber(oldest) then
        oldest = all[i]
      end
    end
  end
  if kind == 'rlock' then
    -- The caller's process counts no grant of it: whatever grant exists is not its hold.
    save()
    return redis.error_reply(others and 'NOTOWNER held by another owner' or 'UNLOCKED not held')
  end
  target = target or oldest
  if target == nil then
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
    -- A hold without a lease (expiry 0) keeps none.
    local renewed = expiry == 0 and 0 or now + lease
    redis.call('HSET', KEYS[2], target, owner .. '|' .. renewed .. '|' .. (count - 1))
    if renewed > 0 then
      note_expiry(renewed)
    end
    save()
    return {1, count - 1}
  end
  redis.call('HDEL', KEYS[2], target)
end
if bound >= 0 and value >= bound then
  save()
  return redis.error_reply('TOOMANY released too many times')
end
value = value + 1
dirty = true
grant_waiters()
save()
return {1, 0}
