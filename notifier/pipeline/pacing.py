"""Spread deferred deliveries over the future instead of waking them all at the same instant.

A refused take says "a token is due in t seconds" to every waiting delivery alike; waking them
all then lets one win and sends the rest back to sleep, over and over. Instead each deferred
delivery takes the next free slot of a per-bucket schedule, one refill interval after the
previous slot, on Redis' clock, so the fleet wakes them about as fast as tokens come back.
"""

from __future__ import annotations

import redis

from notifier.ledger import PREFIX
from notifier.ratelimit import Bucket

_NEXT_SLOT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local tail = tonumber(redis.call('GET', KEYS[1]) or '0')
local slot = math.max(now + tonumber(ARGV[1]), tail + tonumber(ARGV[2]))
-- The tail lives past the last slot it hands out (a storm books slots minutes ahead): expired
-- earlier, newcomers would stop queueing behind the deliveries still waiting for theirs.
redis.call('SET', KEYS[1], tostring(slot), 'EX', math.ceil(slot - now) + tonumber(ARGV[3]))
return tostring(slot - now)
"""


class Pacer:
    def __init__(self, client: redis.Redis) -> None:
        self._next_slot = client.register_script(_NEXT_SLOT)

    @staticmethod
    def key(bucket: Bucket) -> str:
        """The bucket's schedule tail (epoch seconds of its last handed-out slot). While it is
        ahead, deferred deliveries are waiting for this bucket and a newcomer queues behind them
        (taking a freed token first would jump the line and send in clumps): checked by
        `TokenBuckets.take(..., behind=)` in the take itself."""
        return f"{PREFIX}pace:{bucket.key}"

    def slot(self, bucket: Bucket, earliest: float) -> float:
        """Seconds from now at which this deferred delivery should try again."""
        interval = 1.0 / bucket.limit.refill_per_second
        margin = int(interval) + 60  # kept this long after the last slot (seconds)
        delay = self._next_slot(keys=[self.key(bucket)],
                                args=[repr(earliest), repr(interval), margin])
        return float(delay)
