"""Counting an outcome that may change once it is counted, exactly once per change.

A delivery or a transaction can be counted, then get another verdict: an SMS counted `sent`
is delivered or failed by its receipt, and its transaction counted `delivered` may then end
failed. The counters are Prometheus counters: one going down reads as a reset to `rate()`
(the whole counter counted again), so a change is never a decrement. Instead the new series
goes up by one, and so does the old one's series in a second counter of *revisions* (the same
labels): counter minus revisions is what ended each way, and the sum of counter minus the sum
of revisions counts each thing once. The hash remembers the series it is counted under, so
writing the same verdict again (a redelivered task, the reaper, a receipt applied twice)
counts nothing.
"""

COUNTED = "counted_as"  # the hash field naming the series its object is counted under

RECOUNT = f"""
-- recount(hash, counter, revisions, series): count the object of `hash` under `series` (a field
-- of the counter hash) unless it is counted there already; if it was counted under another
-- series, that one goes up in `revisions`. Returns false when nothing changed, else the series
-- it was counted under before ('' for none).
local function recount(hash, counter, revisions, series)
  local was = redis.call('HGET', hash, '{COUNTED}')
  if was == series then return false end
  redis.call('HSET', hash, '{COUNTED}', series)
  redis.call('HINCRBYFLOAT', counter, series, 1)
  if was then redis.call('HINCRBYFLOAT', revisions, was, 1) end
  return was or ''
end
"""
