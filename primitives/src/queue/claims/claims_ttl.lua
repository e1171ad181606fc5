-- Keeps a queue's claims (claims/mod.rs) alive as long as its items: the claims hash, every
-- holder's claim and landing list, and the fences hash (named after the claim prefix:
-- `<...>:claim:` -> `<...>:claim_fences`). Shared by the claim scripts, feed.lua and put.lua.
-- At most once per tenth of the TTL (a marker, `<...>:claim_refreshed`, lives that long): the
-- refresh costs two commands per holder, and puts come by the thousand while many gets wait.
-- So that the claims still outlive the items, whose TTL every put refreshes, they get the TTL
-- and a tenth more. A claim and the fences get their TTL when a fetch writes them too.
local function refresh_claims(claims_key, claim_prefix, ttl)
  local base = string.sub(claim_prefix, 1, -2)
  local seconds = tonumber(ttl)
  if not redis.call('SET', base .. '_refreshed', 1, 'NX', 'PX', seconds * 100) then
    return
  end
  local long = seconds + math.floor(seconds / 10) + 1
  local holders = redis.call('HKEYS', claims_key)
  if #holders > 0 then
    redis.call('EXPIRE', claims_key, long)
    redis.call('EXPIRE', base .. '_fences', long)
    for _, holder in ipairs(holders) do
      redis.call('EXPIRE', claim_prefix .. holder, long)
      redis.call('EXPIRE', claim_prefix .. holder .. ':in', long)
    end
  end
end
