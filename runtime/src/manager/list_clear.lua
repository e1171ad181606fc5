-- l.clear(). Returns the number of items removed.
local h, err = open_list('')
if not h then
  return err
end
local n = redis.call('LLEN', KEYS[2])
if n > 0 then
  redis.call('DEL', KEYS[2])
  changed(h, true)
end
return n
