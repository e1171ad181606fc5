-- Free permits now (Semaphore.get_value, Lock.locked), after the grants of dead holders were
-- reclaimed (and handed to waiters), so that a lapsed hold does not count as held.
-- Returns the number of free permits.
reclaim()
grant_waiters()
save()
return value
