-- l.append(x), l.extend(xs). ARGV[3..] the encoded items. Returns the new length.
local h, err = open_list('')
if not h then
  return err
end
local len = push_all(KEYS[2], ARGV, 3, #ARGV)
if len == #ARGV - 2 then
  -- The items list was created: give it its TTL.
  redis.call('EXPIRE', KEYS[2], ttl)
end
changed(h, true)
return len
