-- n.name (ARGV[4] '0': the encoded value, nil when missing) and hasattr(n, name) (ARGV[4] '1':
-- 1 or 0). KEYS[1] attrs hash ('a:' .. name -> encoded value, plus '\0v' and '\0r'),
-- KEYS[2] the manager's container index, KEYS[3] its meta. ARGV[3] the attribute's field
-- ('a:' .. name).
local h, err = open(ARGV[3])
if not h then
  return err
end
if ARGV[4] == '1' then
  return h[3] and 1 or 0
end
return h[3]
