-- Keeps a queue's claims (claims.rs) alive as long as its items: the claims hash, every
-- holder's claim and landing list, and the fences hash (named after the claim prefix:
-- `<...>:claim:` -> `<...>:claim_fences`). Shared by the claim scripts, feed.lua and put.lua.
local function refresh_claims(claims_key, claim_prefix, ttl)
  local holders = redis.call('HKEYS', claims_key)
  if #holders > 0 then
    redis.call('EXPIRE', claims_key, ttl)
    redis.call('EXPIRE', string.sub(claim_prefix, 1, -2) .. '_fences', ttl)
    for _, holder in ipairs(holders) do
      redis.call('EXPIRE', claim_prefix .. holder, ttl)
      redis.call('EXPIRE', claim_prefix .. holder .. ':in', ttl)
    end
  end
end
