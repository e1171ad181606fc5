-- First step of Manager.shutdown: no container may be created from now on (and no type
-- registered, no instance recorded, nothing published). Returns {the meta's field names, the
-- first page of the index, the instances}: the caller stops the instances ({'a:<actor id>',
-- its value, ...}: the value says in which namespace the instance runs, see registered.rs),
-- deletes the keys of each container the index lists ('<kind>:<capability>') page by page, then
-- the index and the meta. {{}, {}, {}} when the manager is already gone. Run again by a shutdown
-- that failed half way (the meta, deleted last, still exists): it returns what is left.
-- KEYS[1] the meta hash, KEYS[2] the container index. ARGV[1] the page size.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {{}, {}, {}}
end
redis.call('HSET', KEYS[1], 'state', 'shutdown')
local fields = redis.call('HKEYS', KEYS[1])
-- Only the instances' values: the other fields' (published values) may be large.
local instances = {}
for _, field in ipairs(fields) do
  if string.sub(field, 1, 2) == 'a:' then
    instances[#instances + 1] = field
    instances[#instances + 1] = redis.call('HGET', KEYS[1], field)
  end
end
return {fields, redis.call('ZRANGE', KEYS[2], 0, tonumber(ARGV[1]) - 1), instances}
