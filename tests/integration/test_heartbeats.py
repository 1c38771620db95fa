"""Worker heartbeats and the workers gauge, on a real Redis."""

from __future__ import annotations

import time

import redis

from notifier.api.gauges import workers
from notifier.heartbeats import LEGACY_PREFIX, WORKERS, Heartbeats

ALL = ["notifier.dispatch", "notifier.control", "notifier.sms", "notifier.email", "notifier.push"]


def _commands(client: redis.Redis) -> dict[str, int]:
    """Commands Redis ran since the last CONFIG RESETSTAT (scripts' own calls included)."""
    stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(row["calls"]) for name, row in stats.items()
            if not name.startswith(("cmdstat_info", "cmdstat_config"))}


def _gauge(client: redis.Redis) -> dict[str, float]:
    """notifier_workers_alive by queue."""
    return {labels["queue"]: value for _, _, labels, value in workers(client)}


def test_workers_gauge_cost_does_not_grow_with_the_ledger(redis_client: redis.Redis) -> None:
    """A week of ledger is millions of keys: counting workers must not walk them (a SCAN of the
    keyspace took seconds per scrape, past Prometheus' scrape timeout)."""
    pipe = redis_client.pipeline(transaction=False)
    for i in range(100_000):
        pipe.set(f"ntf:tx:tx-{i:08d}", "x")
    pipe.execute()
    Heartbeats(redis_client).beat("notifier-h-1", ["notifier.sms"])
    assert _gauge(redis_client)["notifier.sms"] == 1.0  # loads the script, as a first scrape
    redis_client.config_resetstat()
    assert _gauge(redis_client)["notifier.sms"] == 1.0
    ran = _commands(redis_client)
    assert "scan" not in ran and "keys" not in ran, ran
    assert ran.pop("evalsha") == 1, ran  # one round trip, and within it:
    assert ran == {"time": 1, "zrangebyscore": 1}


def test_live_workers_are_counted_per_queue_they_consume(redis_client: redis.Redis) -> None:
    """A pool per queue (notifier-worker@sms, @email, @push, @core): the sms pool is dead, the
    others beat. The fleet still has live workers, but notifier.sms has none."""
    heartbeats = Heartbeats(redis_client)
    heartbeats.beat("notifier-core-1", ["notifier.dispatch", "notifier.control"])
    heartbeats.beat("notifier-core-2", ["notifier.dispatch", "notifier.control"])
    heartbeats.beat("notifier-email-1", ["notifier.email"])
    heartbeats.beat("notifier-email-1", ["notifier.email"])  # beating again is no second worker
    heartbeats.beat("notifier-push-1", ["notifier.push"])
    assert _gauge(redis_client) == {"notifier.dispatch": 2.0, "notifier.control": 2.0,
                                    "notifier.sms": 0.0, "notifier.email": 1.0,
                                    "notifier.push": 1.0}
    heartbeats.beat("notifier-all-1", ALL)  # `notifier worker` with its default --queues
    assert _gauge(redis_client)["notifier.sms"] == 1.0
    assert _gauge(redis_client)["notifier.dispatch"] == 3.0


def test_a_worker_that_stops_beating_is_no_longer_counted_and_is_trimmed(
        redis_client: redis.Redis) -> None:
    heartbeats = Heartbeats(redis_client, ttl=0.5)
    heartbeats.beat("notifier-dead-1", ["notifier.sms", "notifier.email"])
    heartbeats.beat("notifier-live-2", ["notifier.sms"])
    assert {w for _, w in heartbeats.alive()} == {"notifier-dead-1", "notifier-live-2"}
    time.sleep(0.6)
    assert heartbeats.alive() == []  # nobody beat within ttl: the whole fleet is dead
    heartbeats.beat("notifier-live-2", ["notifier.sms"])
    assert heartbeats.alive() == [("notifier.sms", "notifier-live-2")]
    # the dead worker's members are gone, not just skipped: restarts (new pids) do not pile up
    assert redis_client.zrange(WORKERS, 0, -1) == [b"notifier.sms|notifier-live-2"]


def test_a_beat_also_writes_the_key_an_api_not_yet_upgraded_counts(
        redis_client: redis.Redis) -> None:
    """Rolling upgrade: an API of the version before SCANs `ntf:worker:*` and counts the keys;
    it must see upgraded workers (and not count the new set as one)."""
    Heartbeats(redis_client).beat("notifier-h-1", ALL)
    Heartbeats(redis_client).beat("notifier-h-2", ["notifier.sms"])
    legacy = sorted(redis_client.scan_iter(match=f"{LEGACY_PREFIX}*"))
    assert legacy == [b"ntf:worker:notifier-h-1", b"ntf:worker:notifier-h-2"]
    assert 0 < redis_client.ttl(legacy[0]) <= 15
