-- l.reverse(). Returns the length.
local h, err = open_list('')
if not h then
  return err
end
local items = redis.call('LRANGE', KEYS[2], 0, -1)
if #items > 1 then
  redis.call('DEL', KEYS[2])
  -- LPUSH of a batch puts it at the head reversed; batch after batch reverses the whole.
  local i = 1
  while i <= #items do
    local j = math.min(i + 999, #items)
    redis.call('LPUSH', KEYS[2], unpack(items, i, j))
    i = j + 1
  end
  redis.call('EXPIRE', KEYS[2], ttl)
end
changed(h, true)
return #items
