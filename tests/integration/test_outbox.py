"""The outbox: a transaction stored but not dispatched is published again, once per period."""

from __future__ import annotations

import time

import pytest
import redis

from notifier.config import settings_from_mapping
from notifier.errors import BrokerUnavailable
from notifier.intake import Intake
from notifier.ledger import Ledger
from notifier.metrics import Metrics
from notifier.models import Event, Source
from notifier.periodic import periodic_jobs
from notifier.tasks_spec import DISPATCH
from tests.support.inline import ListPublisher

CONFIG = {"channels": {"email": {"provider": "sandbox"}},
          "recipients": {"alice": {"email": "alice@example.com"}},
          "routes": [{"match": {}, "to": ["alice"], "channels": ["email"]}],
          "reaper_after": "60s"}


class BrokenPublisher(ListPublisher):
    def publish(self, task: str, args: list[str], queue: str) -> None:
        raise BrokerUnavailable("cannot publish notifier.dispatch: ConnectionError")


def sweep(redis_url: str, client: redis.Redis, publisher: ListPublisher) -> None:
    settings = settings_from_mapping({**CONFIG, "redis_url": redis_url})
    jobs = dict((job.__name__, job) for _, job in periodic_jobs(settings, client, publisher))
    jobs["sweep_outbox"]()


def test_failed_publish_is_swept_and_a_published_one_is_not_multiplied(
        redis_url: str, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_from_mapping({**CONFIG, "redis_url": redis_url})
    ledger, metrics = Ledger(redis_client), Metrics(redis_client)
    with pytest.raises(BrokerUnavailable):
        Intake(settings, ledger, BrokenPublisher(), metrics).submit(
            Event(kind="alert", title="stored, not published"), Source.API)
    (lost,) = [m.decode() for m in redis_client.zrange("ntf:outbox", 0, -1)]
    good = ListPublisher()
    published = Intake(settings, ledger, good, metrics).submit(
        Event(kind="alert", title="published"), Source.API).transaction_id

    sweeper = ListPublisher()
    sweep(redis_url, redis_client, sweeper)
    assert sweeper.tasks == []  # the failed one is younger than 5 s
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now + 6)
    sweep(redis_url, redis_client, sweeper)
    assert [(t, a) for t, a, _ in sweeper.tasks] == [(DISPATCH, [lost])]
    sweep(redis_url, redis_client, sweeper)  # once per reaper_after, not every tick
    assert len(sweeper.tasks) == 1
    monkeypatch.setattr(time, "time", lambda: now + 67)  # past reaper_after for both
    sweep(redis_url, redis_client, sweeper)
    assert sorted(a[0] for _, a, _ in sweeper.tasks[1:]) == sorted([lost, published])
