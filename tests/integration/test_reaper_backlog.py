"""The reaper and a deep but healthy backlog: deliver tasks queued on the real Celery list
(real redis-server), taken by workers slower than `reaper_after`. Their tasks are still in the
queue, so re-queueing them would only add no-op copies behind the backlog, every sweep."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest

from notifier.celery_app import CeleryPublisher, make_celery
from notifier.channels.sandbox import outbox_key
from notifier.models import Event, Source
from notifier.pipeline.deliver import deliver_batch
from notifier.pipeline.dispatch import dispatch_all
from notifier.pipeline.reaper import reap
from notifier.tasks_spec import DELIVER, deliver_queue
from tests.integration.conftest import MakeFleet
from tests.support.inline import InlineFleet, decode_task

EVENTS, TAKEN_PER_PERIOD, REAPER_AFTER = 40, 10, 60.0
CONFIG: dict[str, Any] = {
    "channels": {"email": {"provider": "sandbox"}},
    "recipients": {"alice": {"email": "alice@example.com"}},
    "routes": [{"match": {}, "to": ["alice"], "channels": ["email"]}],
}


def backlog(fleet: InlineFleet, redis_url: str) -> list[str]:
    """EVENTS alerts whose deliver tasks wait on the real email queue; their delivery ids."""
    txids = [fleet.intake.submit(Event(kind="alert", title=f"storm {i}"), Source.API).transaction_id
             for i in range(EVENTS)]
    fleet.publisher.tasks.clear()
    fleet.deps.publisher = CeleryPublisher(make_celery(redis_url))
    dispatch_all(fleet.deps, txids)  # no token: every delivery is queued as a task
    return [d.id for t in txids for d in fleet.deps.ledger.deliveries(t)]


def take(fleet: InlineFleet, n: int) -> int:
    """A worker takes up to `n` tasks off the queue (oldest first, as Celery's BRPOP does)."""
    taken = 0
    while taken < n and (raw := fleet.redis.rpop(deliver_queue("email"))) is not None:
        task, args = decode_task(raw)
        assert task == DELIVER
        deliver_batch(fleet.deps, args, uuid.uuid4().hex)
        taken += 1
    return taken


def sweep_while_taking(fleet: InlineFleet, monkeypatch: pytest.MonkeyPatch) -> tuple[list[str], int]:
    """Reaper periods, the queue moving TAKEN_PER_PERIOD tasks each, until a sweep finds the
    queue empty: (what the reaper re-queued, how many tasks the workers took)."""
    clock = [time.time()]
    monkeypatch.setattr(time, "time", lambda: clock[0])
    requeued: list[str] = []
    taken = 0
    while True:
        clock[0] += REAPER_AFTER + 1
        empty = not fleet.redis.llen(deliver_queue("email"))
        requeued += reap(fleet.deps.ledger, fleet.deps.publisher, stale_after=REAPER_AFTER,
                         lease=120.0)
        taken += take(fleet, TAKEN_PER_PERIOD)
        if empty:
            return requeued, taken


def test_a_moving_backlog_is_not_multiplied_by_the_reaper(
        make_fleet: MakeFleet, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    fleet = make_fleet(CONFIG)
    dids = backlog(fleet, redis_url)
    # The last alerts wait EVENTS / TAKEN_PER_PERIOD periods, each swept once per period.
    requeued, taken = sweep_while_taking(fleet, monkeypatch)
    ledger = fleet.deps.ledger
    assert {ledger.delivery(d).status for d in dids} == {"sent"}  # type: ignore[union-attr]
    assert fleet.redis.llen(outbox_key("email")) == EVENTS  # each alert sent once
    # Nothing was lost, so nothing needed re-queueing: the workers took one task per alert.
    assert (requeued, taken) == ([], EVENTS)


def test_a_task_lost_from_a_moving_backlog_is_requeued_once_it_drained(
        make_fleet: MakeFleet, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    fleet = make_fleet(CONFIG)
    dids = backlog(fleet, redis_url)
    lost = fleet.redis.rpop(deliver_queue("email"))  # the oldest: a worker died holding it
    assert lost is not None and decode_task(lost)[1] == [dids[0]]
    requeued, taken = sweep_while_taking(fleet, monkeypatch)
    assert requeued == [dids[0]] and taken == EVENTS
    ledger = fleet.deps.ledger
    assert {ledger.delivery(d).status for d in dids} == {"sent"}  # type: ignore[union-attr]
    assert fleet.redis.llen(outbox_key("email")) == EVENTS
