-- Value.fetch_add / Array.fetch_add on an integer: add and check the C type's range.
-- KEYS[1] the value string (Value) or the items hash (Array)
-- ARGV[1] TTL, ARGV[2] delta, ARGV[3] smallest allowed, ARGV[4] largest allowed,
-- ARGV[5] the array index ('' for a Value)
-- Returns the value before the add, as Redis stored it (a string: Lua numbers are doubles,
-- inexact past 2^53, so no arithmetic is done on it here). Errors: GONE, OVERFLOW (the sum is
-- outside the type, or outside the 64 bits Redis adds in; nothing changes).
if redis.call('EXISTS', KEYS[1]) == 0 then
  return redis.error_reply('GONE the value does not exist')
end
local old, new
if ARGV[5] == '' then
  old = redis.call('GET', KEYS[1])
  new = redis.pcall('INCRBY', KEYS[1], ARGV[2])
else
  old = redis.call('HGET', KEYS[1], ARGV[5])
  if not old then
    return redis.error_reply('GONE the element does not exist')
  end
  new = redis.pcall('HINCRBY', KEYS[1], ARGV[5], ARGV[2])
end
-- Refused by Redis: the stored value is not an integer (not written by shoal), or the sum
-- leaves 64 bits. Nothing was written. Any other refusal (READONLY: a primary demoted in a
-- failover; OOM) is passed on as it is: the caller tells those apart.
if type(new) == 'table' then
  local why = tostring(new.err)
  if not (string.find(why, 'overflow', 1, true) or string.find(why, 'not an integer', 1, true)) then
    return new
  end
  if not (old and string.match(old, '^-?%d+$')) then
    return redis.error_reply('CORRUPT the stored value is not an integer')
  end
  return redis.error_reply('OVERFLOW ' .. tostring(new.err))
end
-- The bounds are within 64 bits and INCRBY's result too, so comparing them as doubles can
-- only be inexact at the 64-bit ends, where INCRBY itself checked.
if new < tonumber(ARGV[3]) or new > tonumber(ARGV[4]) then
  -- Put back the exact old value (subtracting the delta again would go through a double).
  if ARGV[5] == '' then
    redis.call('SET', KEYS[1], old, 'KEEPTTL')
  else
    redis.call('HSET', KEYS[1], ARGV[5], old)
  end
  return redis.error_reply('OVERFLOW the sum is outside the type')
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return old
