-- l.pop(i), del l[i]. ARGV[3] the index ('' for the last item).
-- Returns {2, item}; {0, nil} when the list is empty, {1, nil} when i is outside it (nothing
-- changes).
local h, err = open_list('')
if not h then
  return err
end
local n = redis.call('LLEN', KEYS[2])
if n == 0 then
  return {0, false}
end
local i = index(ARGV[3] == '' and -1 or ARGV[3], n)
if not i then
  return {1, false}
end
local value = remove_at(i, n)
changed(h, true)
return {2, value}
