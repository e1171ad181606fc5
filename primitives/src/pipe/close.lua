-- A holder lets go of an end: a process closed (or dropped) its last handle of it, or a handle
-- received but never used gives its transfer back. The end closes when it was the last holder.
-- ARGV[3] the end, ARGV[4] the holder. Errors: GONE.
if not exists() then
  return redis.error_reply('GONE the pipe does not exist')
end
resume()
let_go(tonumber(ARGV[3]), ARGV[4])
reap()
return 1
