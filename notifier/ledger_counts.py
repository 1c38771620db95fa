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

from redis.client import Pipeline

from notifier.ledger_keys import delivery_key
from notifier.metrics import metric_field, metric_key
from notifier.redis_conn import queue_script

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

COUNT_DELIVERY = RECOUNT + """
-- KEYS: the delivery, the deliveries counter, its revisions counter; ARGV: the series to count
-- it under. Returns 1 when that changed its count.
return recount(KEYS[1], KEYS[2], KEYS[3], ARGV[1]) and 1 or 0
"""

SET_IF_STATUS = RECOUNT + f"""
-- A receipt's write to a delivery, only while it has the status the receipt found (`sent`), all
-- or nothing: its fields and, when the receipt decides its outcome (delivered), its count
-- moved there. A failed receipt passes no series: the fallback it starts decides (failed or
-- fallen_back) and counts; until then the delivery stays counted as sent, which is how a
-- re-applied receipt tells an unfinished fallback from a finished one.
-- KEYS: as COUNT_DELIVERY's
-- ARGV: the expected status, the series it was counted under on reaching it (a version before
--       {COUNTED} did not write it down), the series to count it under now or '', then field,
--       value, ...
if redis.call('HGET', KEYS[1], 'status') ~= ARGV[1] then return 0 end
for i = 4, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('HSETNX', KEYS[1], '{COUNTED}', ARGV[2])
if ARGV[3] ~= '' then recount(KEYS[1], KEYS[2], KEYS[3], ARGV[3]) end
return 1
"""


def delivery_series(channel: str, provider: str, outcome: str) -> str:
    """The deliveries counter's series (hash field) of one outcome; `-`: no provider tried."""
    return metric_field("notifier_deliveries", channel=channel, provider=provider or "-",
                        outcome=outcome)


DELIVERY_COUNTERS = (metric_key("notifier_deliveries"), metric_key("notifier_deliveries_revised"))


def delivery_count_keys(did: str) -> list[str]:
    return [delivery_key(did), *DELIVERY_COUNTERS]


def count_delivery(pipe: Pipeline, did: str, *, channel: str, provider: str,
                   outcome: str) -> None:
    """Queue on `pipe` the count of delivery `did` under `outcome`: once, whatever runs it again,
    and moved from the series it was counted under, if another (see the module's doc)."""
    queue_script(pipe, COUNT_DELIVERY, delivery_count_keys(did),
                 [delivery_series(channel, provider, outcome)])
