-- keys(), values(), items(), copy() (everything) and iteration (a page at a time), in insertion
-- order.
-- KEYS as dict_get.lua. ARGV[3] the score of the last key of the previous page (0 at the
-- start: keys are scored from 1, the order's '\0' -inf), ARGV[4] most keys (0: all), ARGV[5]
-- the version the iteration started at ('' for none), ARGV[6] what to return of each pair:
-- 'k' its key (keys()), 'v' its value (values()), anything else the key, the value and the
-- score; keys() and values() fetch only their half, so a value that would not decode is not
-- sent to keys(), and no value is sent needlessly.
-- Returns {version, key, value, score, key, value, score, ...} (or {version, key, key, ...}, or
-- {version, value, value, ...}); only {version} when ARGV[5] is given and the version differs
-- (keys were added or removed since).
local h, err = open()
if not h then
  return err
end
if ARGV[5] ~= '' and h[1] ~= ARGV[5] then
  return {h[1]}
end
local entries
-- Where the keys start in `entries` (a key, then its score).
local i = 1
if tonumber(ARGV[4]) == 0 then
  -- From rank 0, the '\0' that keeps the zset existing: its presence shows the order is whole.
  entries = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
  if entries[1] ~= '\0' then
    return lost_order()
  end
  i = 3
else
  entries = redis.call('ZRANGE', KEYS[2], '(' .. ARGV[3], '+inf', 'BYSCORE', 'LIMIT', 0,
    ARGV[4], 'WITHSCORES')
  -- An empty page ends an iteration: not before the order is known to exist.
  if #entries == 0 and not has_order() then
    return lost_order()
  end
end
local mode = ARGV[6]
local out = {h[1]}
while i <= #entries do
  local j = math.min(i + 1999, #entries)
  local keys = {}
  for k = i, j, 2 do
    keys[#keys + 1] = entries[k]
  end
  -- Read in every mode: a key of the order without a value is reported, whatever is returned.
  local values = redis.call('HMGET', KEYS[1], unpack(keys))
  for k = 1, #keys do
    if not values[k] then
      return redis.error_reply('CORRUPT a key in the order has no value')
    end
    if mode == 'k' then
      out[#out + 1] = keys[k]
    elseif mode == 'v' then
      out[#out + 1] = values[k]
    else
      out[#out + 1] = keys[k]
      out[#out + 1] = values[k]
      out[#out + 1] = entries[i + 2 * k - 1]
    end
  end
  i = j + 1
end
return out
