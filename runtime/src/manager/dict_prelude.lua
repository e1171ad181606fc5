-- Shared by the dict scripts (after container_prelude.lua).
-- KEYS[1] data hash, KEYS[2] order zset, which holds the member '\0' (scored -inf) for as long
-- as the dict exists: an order that is missing (or lacks its '\0') while the data exists means
-- the dict's keys were broken apart (one expired or was deleted without the other). The dict is
-- then reported corrupt: a write must not make the order again (without its '\0' and its TTL:
-- the key would leak, len() and the iterations would miss keys), and a read must not answer
-- as if the dict were empty.

-- The error for a dict whose order is missing.
local function lost_order()
  return redis.error_reply('CORRUPT the dict has data but no insertion order')
end

-- Whether the order exists (1 call: only where a key is about to be added to it, or where a read
-- found it empty, never on the hot path of get and of set of an existing key).
local function has_order()
  return redis.call('EXISTS', KEYS[2]) == 1
end
