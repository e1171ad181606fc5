-- l[start:stop], with Python's slice bounds (negative from the end, clamped to the list).
-- ARGV[3] start, ARGV[4] stop ('' for none).
local h, err = open()
if not h then
  return err
end
local n = redis.call('LLEN', KEYS[2])
local function bound(x, default)
  if x == '' then
    return default
  end
  x = tonumber(x)
  if x < 0 then
    return math.max(0, x + n)
  end
  return math.min(x, n)
end
local start = bound(ARGV[3], 0)
local stop = bound(ARGV[4], n)
if stop <= start then
  return {}
end
return redis.call('LRANGE', KEYS[2], start, stop - 1)
