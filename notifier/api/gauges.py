"""Gauges computed from Redis at scrape time: backlog, timers, dead letters, breakers, workers."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

import redis

from notifier.breaker import BreakerStatus
from notifier.config import Settings
from notifier.heartbeats import Heartbeats
from notifier.ledger_keys import DEADLETTERS, OUTBOX
from notifier.metrics import Gauges
from notifier.operations import BreakerControl
from notifier.redis_health import maxmemory_policy, writable
from notifier.scheduler import TIMERS
from notifier.tasks_spec import ALL_QUEUES

BREAKER_STATES = ("closed", "open", "half_open", "forced_open", "forced_closed")

Row = tuple[str, str, Mapping[str, str], float]


def backlog(client: redis.Redis) -> list[Row]:
    pipe = client.pipeline(transaction=False)
    for queue in ALL_QUEUES:
        pipe.llen(queue)
    pipe.zcard(TIMERS)
    pipe.zcard(OUTBOX)
    pipe.zcard(DEADLETTERS)
    *lengths, timers, outbox, dead = pipe.execute()
    rows: list[Row] = [
        ("notifier_queue_backlog", "Tasks waiting in each broker queue.", {"queue": q}, float(n))
        for q, n in zip(ALL_QUEUES, lengths, strict=True)
    ]
    rows.append(("notifier_timers_pending", "Retries, deferrals and deadlines waiting to fire.",
                 {}, float(timers)))
    rows.append(("notifier_outbox_pending", "Accepted transactions not yet fanned out.", {},
                 float(outbox)))
    rows.append(("notifier_dead_letters", "Failed transactions awaiting replay.", {}, float(dead)))
    return rows


def breakers(settings: Settings) -> Gauges:
    """The breakers of the configured providers, as `notifier breakers` lists them. One of a
    provider no longer configured keeps its state in Redis (forced open, or open with nothing
    left to try it): exported, it would hold an alert no command can clear."""
    def rows_of(client: redis.Redis) -> list[Row]:
        return _breaker_rows(BreakerControl(client, settings).list())
    return rows_of


def _breaker_rows(statuses: list[BreakerStatus]) -> list[Row]:
    rows: list[Row] = []
    for status in statuses:
        for state in BREAKER_STATES:
            rows.append(("notifier_breaker_state",
                         "1 for the state each provider's circuit breaker is in.",
                         {"breaker": status.name, "state": state},
                         1.0 if status.state.value == state else 0.0))
    return rows


def workers(client: redis.Redis) -> list[Row]:
    # Per queue, not fleet-wide: with a pool per queue, a dead pool leaves the others counting,
    # and its queue fills with nobody to take from it. Every queue gets a row, 0 included.
    alive = Counter(queue for queue, _ in Heartbeats(client).alive())
    return [("notifier_workers_alive", "Live worker processes consuming each broker queue.",
             {"queue": q}, float(alive[q])) for q in ALL_QUEUES]


def redis_health(client: redis.Redis) -> list[Row]:
    """Whether Redis takes writes (it answers reads at maxmemory, so notifier_redis_up stays 1
    while every webhook gets a 503) and its maxmemory-policy (when INFO or CONFIG tells)."""
    rows: list[Row] = [("notifier_redis_writable",
                        "1 when Redis accepted a write during the scrape (0: refused, e.g. OOM).",
                        {}, 1.0 if writable(client) else 0.0)]
    policy = maxmemory_policy(client)
    if policy is not None:
        rows.append(("notifier_redis_maxmemory_policy",
                     "1 for Redis' maxmemory-policy (notifier needs noeviction).",
                     {"policy": policy}, 1.0))
    return rows


def fleet_gauges(settings: Settings) -> list[Gauges]:
    return [backlog, breakers(settings), workers, redis_health]
