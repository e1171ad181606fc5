-- len(l), and the shape an iterator starts from. Returns {length, version, shape}.
local h, err = open_list()
if not h then
  return err
end
return {redis.call('LLEN', KEYS[2]), h[1], h[3]}
