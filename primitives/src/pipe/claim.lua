-- A process takes a hold of an end: a received handle replaces its transfer with the receiving
-- process (which renews it from then on), or a process whose hold lapsed while it was alive
-- takes it again. An end that every holder already let go stays closed.
-- ARGV[3] the end, ARGV[4] the transfer id ('' for none), ARGV[5] the process.
-- Returns 1 when the process holds the end (for a lease from now), 0 when the end is closed.
-- Errors: GONE.
if not exists() then
  return redis.error_reply('GONE the pipe does not exist')
end
resume()
reap()
local e = tonumber(ARGV[3])
if is_closed(e) then
  return 0
end
hold(e, ARGV[5])
if ARGV[4] ~= '' then
  redis.call('HDEL', holders[e + 1], ARGV[4])
end
return 1
