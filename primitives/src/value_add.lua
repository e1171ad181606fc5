-- Value.fetch_add / Array.fetch_add on an integer: add and check the C type's range.
-- KEYS[1] the value string (Value) or the items hash (Array)
-- ARGV[1] TTL, ARGV[2] delta, ARGV[3] smallest allowed, ARGV[4] largest allowed,
-- ARGV[5] the array index ('' for a Value)
-- Returns the new value. Errors: GONE, OVERFLOW (the sum is outside the type; nothing changes).
if redis.call('EXISTS', KEYS[1]) == 0 then
  return redis.error_reply('GONE the value does not exist')
end
local new
if ARGV[5] == '' then
  new = redis.call('INCRBY', KEYS[1], ARGV[2])
else
  if redis.call('HEXISTS', KEYS[1], ARGV[5]) == 0 then
    return redis.error_reply('GONE the element does not exist')
  end
  new = redis.call('HINCRBY', KEYS[1], ARGV[5], ARGV[2])
end
if new < tonumber(ARGV[3]) or new > tonumber(ARGV[4]) then
  if ARGV[5] == '' then
    redis.call('DECRBY', KEYS[1], ARGV[2])
  else
    redis.call('HINCRBY', KEYS[1], ARGV[5], -tonumber(ARGV[2]))
  end
  return redis.error_reply('OVERFLOW the sum is outside the type')
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return new
