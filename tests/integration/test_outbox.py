"""Acceptance stores the event and queues its dispatch task together; the outbox is the net
under a dispatch message that got lost anyway (a purged queue, a restored Redis snapshot)."""

from __future__ import annotations

import time

import pytest
import redis

from notifier.config import settings_from_mapping
from notifier.intake import Intake
from notifier.ledger import Ledger
from notifier.ledger_accept import EVENTS_PER_TASK, AcceptCall
from notifier.models import Event, Source
from notifier.periodic import periodic_jobs
from notifier.records import AcceptOutcome
from notifier.tasks_spec import DISPATCH, DISPATCH_QUEUE
from tests.support.inline import ListPublisher, decode_task

CONFIG = {"channels": {"email": {"provider": "sandbox"}},
          "recipients": {"alice": {"email": "alice@example.com"}},
          "routes": [{"match": {}, "to": ["alice"], "channels": ["email"]}],
          "reaper_after": "60s"}


def sweep(redis_url: str, client: redis.Redis, publisher: ListPublisher) -> None:
    settings = settings_from_mapping({**CONFIG, "redis_url": redis_url})
    jobs = dict((job.__name__, job) for _, job in periodic_jobs(settings, client, publisher))
    jobs["sweep_outbox"]()


def test_accept_queues_the_dispatch_task_in_the_same_step(redis_url: str,
                                                          redis_client: redis.Redis) -> None:
    settings = settings_from_mapping({**CONFIG, "redis_url": redis_url})
    intake = Intake(settings, Ledger(redis_client))  # it has no publisher: the script queues
    txid = intake.submit(Event(kind="alert", title="queued with its record"), Source.API).transaction_id
    assert redis_client.hget(f"ntf:tx:{txid}", "status") == b"accepted"
    (message,) = redis_client.lrange(DISPATCH_QUEUE, 0, -1)
    assert decode_task(message) == (DISPATCH, [txid])


def test_one_call_queues_a_message_per_group_of_events_that_stored_one(
        redis_url: str, redis_client: redis.Redis) -> None:
    """A script call carries more events than one dispatch message names: they go out as
    messages of EVENTS_PER_TASK, in order, and a group that stored nothing queues none."""
    settings = settings_from_mapping({**CONFIG, "redis_url": redis_url})
    ledger = Ledger(redis_client)
    intake = Intake(settings, ledger)

    def call(title: str) -> AcceptCall:
        return intake.prepare(Event(kind="alert", title=title), Source.ALERTMANAGER,
                              dedup_key=f"group-{title}")
    first = [call(f"first-{i}") for i in range(EVENTS_PER_TASK)]
    ledger.accept(intake.script_call(first))
    redis_client.delete(DISPATCH_QUEUE)
    # a group of new events, a group of resends of the first ones, then a short group
    calls = ([call(f"new-{i}") for i in range(EVENTS_PER_TASK)]
             + [call(f"first-{i}") for i in range(EVENTS_PER_TASK)]
             + [call(f"last-{i}") for i in range(3)])
    results = ledger.accept(intake.script_call(calls))
    outcomes = [r.outcome for r in results]
    assert outcomes == ([AcceptOutcome.NEW] * EVENTS_PER_TASK + [AcceptOutcome.DUPLICATE] * EVENTS_PER_TASK
                        + [AcceptOutcome.NEW] * 3)
    queued = [decode_task(m) for m in reversed(redis_client.lrange(DISPATCH_QUEUE, 0, -1))]
    txids = [c.txid for c in calls]
    assert queued == [(DISPATCH, txids[:EVENTS_PER_TASK]), (DISPATCH, txids[-3:])]  # oldest first
    assert redis_client.zcard("ntf:outbox") == 2 * EVENTS_PER_TASK + 3


def test_a_lost_dispatch_message_is_swept_once_per_period(
        redis_url: str, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_from_mapping({**CONFIG, "redis_url": redis_url})
    intake = Intake(settings, Ledger(redis_client))
    txids = [intake.submit(Event(kind="alert", title=f"event {i}"), Source.API).transaction_id
             for i in range(2)]
    redis_client.delete(DISPATCH_QUEUE)  # both messages lost

    sweeper = ListPublisher()
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now + 30)
    sweep(redis_url, redis_client, sweeper)
    assert sweeper.tasks == []  # a queued task is expected to run within reaper_after
    monkeypatch.setattr(time, "time", lambda: now + 61)
    sweep(redis_url, redis_client, sweeper)
    assert sorted(a[0] for _, a, _ in sweeper.tasks) == sorted(txids)
    sweep(redis_url, redis_client, sweeper)  # once per reaper_after, not every tick
    assert len(sweeper.tasks) == 2


def test_history_starts_with_the_acceptance_once(redis_url: str, redis_client: redis.Redis) -> None:
    settings = settings_from_mapping({**CONFIG, "redis_url": redis_url})
    ledger = Ledger(redis_client)
    txid = Intake(settings, ledger).submit(Event(kind="alert", title="history"), Source.API).transaction_id
    ledger.log(txid, "dispatched", deliveries="1")
    created = float(redis_client.hget(f"ntf:tx:{txid}", "created_at") or 0)
    assert ledger.history(txid)[0] == {"at": created, "event": "accepted", "source": "api"}
    assert [h["event"] for h in ledger.history(txid)] == ["accepted", "dispatched"]
    # A transaction accepted before the script stopped writing that line keeps just its own.
    redis_client.lpush(f"ntf:tx:{txid}:log", '{"at": 1.0, "event": "accepted", "source": "api"}')
    assert [h["event"] for h in ledger.history(txid)] == ["accepted", "dispatched"]
    assert ledger.history("tx-unknown") == []
