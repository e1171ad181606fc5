-- Prepended to the actor scripts that compare stream entry ids (actor_activate.lua,
-- actor_handback.lua).
-- Whether stream entry id `a` comes after `b` (`<ms>-<seq>`; an id that does not parse comes
-- after anything, so that a message is never taken for applied).
local function after(a, b)
  local am, as = string.match(a or '', '^(%d+)-(%d+)$')
  local bm, bs = string.match(b or '', '^(%d+)-(%d+)$')
  if not am or not bm then
    return true
  end
  am, bm = tonumber(am), tonumber(bm)
  if am ~= bm then
    return am > bm
  end
  return tonumber(as) > tonumber(bs)
end
