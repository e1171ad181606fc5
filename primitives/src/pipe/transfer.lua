-- A handle is serialized for another process: the transfer holds the end, under the sender's
-- lease, until the receiver claims it (pipe_claim.lua), so the end stays open in between whatever
-- the sender does with its own copy.
-- ARGV[3] the end, ARGV[4] the transfer id (held for a lease from now, renewed by the sender).
-- Errors: GONE, CLOSED (every holder of the end let go).
if not exists() then
  return redis.error_reply('GONE the pipe does not exist')
end
resume()
reap()
local e = tonumber(ARGV[3])
if is_closed(e) then
  return redis.error_reply('CLOSED every holder of this end closed it')
end
hold(e, ARGV[4])
return 1
