-- Every attribute: {field, value, field, value, ...} (fields are 'a:' .. name).
-- KEYS as namespace_get.lua.
local h, err = open()
if not h then
  return err
end
local all = redis.call('HGETALL', KEYS[1])
local out = {}
for i = 1, #all, 2 do
  if string.sub(all[i], 1, 2) == 'a:' then
    out[#out + 1] = all[i]
    out[#out + 1] = all[i + 1]
  end
end
return out
