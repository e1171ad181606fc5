-- dict[key], get, contains: one HMGET (and a TTL refresh once a tenth of the TTL).
-- KEYS[1] data hash (encoded key -> encoded value, plus '\0v' and '\0r'), KEYS[2] order zset
-- (encoded key scored by the version that inserted it, plus the member '\0' scored -inf, which
-- keeps the zset existing), KEYS[3] the manager's container index, KEYS[4] its meta.
-- ARGV[3] the encoded key, ARGV[4] '1' to return only whether it exists.
-- Returns the value (nil when missing), or 1/0.
local h, err = open(ARGV[3])
if not h then
  return err
end
if ARGV[4] == '1' then
  return h[3] and 1 or 0
end
return h[3]
