"""Worker heartbeats: which worker processes are alive, and which queues each consumes.

Every `notifier worker` main process beats every `INTERVAL` seconds: one sorted set
(`ntf:workers`) holds a member `<queue>|<worker name>` per queue it consumes, scored with the
time of its last beat. The API's gauge reads the members beaten within `TTL`, so a scrape costs
one round trip whatever else Redis holds (a SCAN for per-worker keys walked the whole ledger).
Both sides take the time from Redis (`TIME`), so the hosts' clocks need not agree.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence

import redis

from notifier.ledger_keys import PREFIX

WORKERS = f"{PREFIX}workers"
# What versions before the sorted set beat: a key per worker, expiring after TTL. Still written
# so that an API not yet upgraded (it SCANs for these) counts upgraded workers during a rolling
# upgrade; nothing reads it any more. Removable once no such API can remain.
LEGACY_PREFIX = f"{PREFIX}worker:"
TTL = 15.0  # a worker missing three beats in a row is dead
INTERVAL = 5.0
_SEPARATOR = "|"  # never in a worker name (host names cannot hold it)

# KEYS: the heartbeat set, this worker's legacy key. ARGV: ttl, then one member per queue.
# Stale members are trimmed here, by whichever worker beats, so the scrape stays read-only.
_BEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local ttl = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. string.format('%.6f', now - ttl))
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], string.format('%.6f', now), ARGV[i])
end
redis.call('SET', KEYS[2], string.format('%.6f', now), 'EX', math.ceil(ttl))
"""

# KEYS: the heartbeat set. ARGV: ttl. The members beaten within ttl (at most workers x queues).
_ALIVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local since = string.format('%.6f', now - tonumber(ARGV[1]))
return redis.call('ZRANGEBYSCORE', KEYS[1], since, '+inf')
"""


class Heartbeats:
    def __init__(self, client: redis.Redis, ttl: float = TTL) -> None:
        self.redis = client
        self.ttl = ttl
        self._beat = client.register_script(_BEAT)
        self._alive = client.register_script(_ALIVE)

    def beat(self, worker: str, queues: Sequence[str]) -> None:
        members = [f"{queue}{_SEPARATOR}{worker}" for queue in queues]
        self._beat(keys=[WORKERS, f"{LEGACY_PREFIX}{worker}"], args=[self.ttl, *members])

    def alive(self) -> list[tuple[str, str]]:
        """(queue, worker) for each queue each live worker consumes."""
        members = self._alive(keys=[WORKERS], args=[self.ttl])
        pairs = (member.decode().rpartition(_SEPARATOR) for member in members)
        return [(queue, worker) for queue, _, worker in pairs]


def beat_forever(client: redis.Redis, worker: str, queues: Sequence[str]) -> None:
    """The worker's heartbeat thread."""
    heartbeats = Heartbeats(client)
    while True:
        # The worker itself reports Redis trouble; its queues' gauges simply drop.
        with contextlib.suppress(redis.RedisError):
            heartbeats.beat(worker, queues)
        time.sleep(INTERVAL)
