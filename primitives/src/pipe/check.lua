-- A reader's check-in (every second of waiting) and poll(0): lapsed holds are reaped first, so a
-- writer that died shows as end of file.
-- ARGV[3] this end. Returns {this end closed (0/1), messages waiting (the end-of-file marker
-- included), the other end closed (0/1)}: the other end closed and nothing waiting is end of
-- file too, whatever became of the marker (a reader that died between popping it and pushing
-- it back). Errors: GONE.
if not exists() then
  return redis.error_reply('GONE the pipe does not exist')
end
resume()
reap()
local me = tonumber(ARGV[3])
return { is_closed(me) and 1 or 0, redis.call('LLEN', inbox[me + 1]),
  is_closed(1 - me) and 1 or 0 }
