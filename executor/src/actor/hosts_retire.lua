-- Takes a host that is gone (dead, or exiting in order) out of the hosts' consumer group: the
-- activation requests it read and never acknowledged are made again (new entries, for any
-- host), acknowledged and deleted, then the consumer is deleted. Only a consumer left with
-- no pending request is deleted: deleting it drops what it holds.
-- KEYS[1] activations stream
-- ARGV[1] group, ARGV[2] consumer (the host's id), ARGV[3] TTL seconds of the stream,
-- ARGV[4] the stream's approximate MAXLEN
-- Returns how many requests were made again, or -1 when there is no stream or group (nothing
-- to do).
if redis.call('EXISTS', KEYS[1]) == 0 then
  return -1
end
local again = 0
local pending
for _ = 1, 100 do
  pending = redis.pcall('XPENDING', KEYS[1], ARGV[1], '-', '+', 100, ARGV[2])
  if type(pending) ~= 'table' or pending['err'] then
    return -1
  end
  if #pending == 0 then
    break
  end
  for _, p in ipairs(pending) do
    local id = p[1]
    local entries = redis.call('XRANGE', KEYS[1], id, id)
    if entries[1] then
      local fields = entries[1][2]
      for i = 1, #fields - 1, 2 do
        if fields[i] == 'a' then
          redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[4], '*', 'a', fields[i + 1])
          again = again + 1
        end
      end
    end
    redis.call('XACK', KEYS[1], ARGV[1], id)
    redis.call('XDEL', KEYS[1], id)
  end
end
if #pending == 0 then
  redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
end
if again > 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[3])
end
return again
