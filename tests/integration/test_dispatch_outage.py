"""A dispatch that loses Redis part-way (its fan-out written, some send tasks not published yet)
on a real redis-server that is stopped and started again: the message's deliveries go out once
Redis is back, each once, without waiting for the reaper (Celery acks a failed task: nothing
would redeliver the message)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from notifier.channels.sandbox import outbox_key
from notifier.errors import BrokerUnavailable
from notifier.models import Event, Source
from notifier.pipeline.dispatch import dispatch_all, inline_token
from tests.fakes.dysmsapi import FakeDysmsapi
from tests.integration.conftest import SMS_ENV
from tests.support.inline import InlineFleet, ListPublisher
from tests.support.servers import RedisServer


def config(fake: FakeDysmsapi) -> dict[str, Any]:
    sms = {"provider": "aliyun", "endpoint": fake.endpoint, "protocol": "http",
           "sign_name": "运维告警", "templates": {"alert": "SMS_1"}, "recipient_limits": []}
    return {"channels": {"sms": sms, "email": {"provider": "sandbox"}},
            "recipients": {"alice": {"phone": "+8613800138000", "email": "alice@example.com"},
                           "bob": {"phone": "+8613900139000", "email": "bob@example.com"}},
            "routes": [{"match": {}, "to": ["alice", "bob"], "channels": ["sms", "email"]}]}


class OutageAtPublish(ListPublisher):
    """A broker on the ledger's Redis, as in production: a publish fails while that Redis is
    down. The `nth` publish of `task` first stops the server, which starts again a second
    later (in another thread)."""

    def __init__(self, server: RedisServer, task: str, nth: int) -> None:
        super().__init__()
        self.server, self.task, self.left = server, task, nth
        self.restart: threading.Timer | None = None
        self.client = redis.Redis.from_url(server.url, socket_connect_timeout=0.2)

    def publish(self, task: str, args: list[str], queue: str) -> None:
        if task == self.task:
            self.left -= 1
            if self.left == 0:
                self.server.stop()
                self.restart = threading.Timer(1.0, self.server.start)
                self.restart.start()
        try:
            self.client.ping()
        except redis.RedisError as exc:
            raise BrokerUnavailable(f"cannot publish {task}: {type(exc).__name__}") from None
        super().publish(task, args, queue)


@pytest.fixture
def fleet(private_redis: RedisServer, sms_fake: FakeDysmsapi) -> Iterator[InlineFleet]:
    fleet = InlineFleet(private_redis.url, config(sms_fake), SMS_ENV)
    yield fleet
    fleet.close()


def accept_together(fleet: InlineFleet, *titles: str) -> list[str]:
    calls = [fleet.intake.prepare(Event(kind="alert", title=t), Source.ALERTMANAGER,
                                  dedup_key=f"group-{t}") for t in titles]
    fleet.deps.ledger.accept(fleet.intake.script_call(calls))
    fleet.take_queued_dispatches()
    [(_task, named, _queue)] = fleet.publisher.tasks
    fleet.publisher.tasks.clear()
    return list(named)


@pytest.mark.parametrize(("titles", "task", "nth", "budget"), [
    # the second email's deliver task: the first was published, the SMS not sent yet
    (("DiskFull",), "notifier.deliver", 2, 10.0),
    # past its budget, the message re-publishes the rest of its events: that publish fails
    (("A", "B", "C"), "notifier.dispatch", 1, 0.0),
], ids=["deliver-publish", "budget-republish"])
def test_a_dispatch_that_loses_redis_part_way_finishes_once_it_is_back(
        fleet: InlineFleet, private_redis: RedisServer, sms_fake: FakeDysmsapi,
        titles: tuple[str, ...], task: str, nth: int, budget: float) -> None:
    named = accept_together(fleet, *titles)
    broker = OutageAtPublish(private_redis, task, nth)
    fleet.publisher = fleet.deps.publisher = broker
    try:
        dispatch_all(fleet.deps, named, inline_token("task-1"), budget=budget)
    finally:
        if broker.restart is not None:
            broker.restart.join()
        broker.client.close()
    assert broker.left <= 0  # the outage did happen
    fleet.drain()  # the tasks it published (no reaper, no outbox sweep)
    ledger = fleet.deps.ledger
    assert [ledger.transaction(t).status for t in named] == ["delivered"] * len(named)  # type: ignore[union-attr]
    # each person got each alert once on each channel
    assert sorted(m["phone"] for m in sms_fake.messages) == sorted(
        ["13800138000", "13900139000"] * len(named))
    emails = fleet.redis.lrange(outbox_key("email"), 0, -1)
    assert len(emails) == 2 * len(named)


def test_a_dispatch_run_again_past_its_budget_sends_nothing_itself(
        fleet: InlineFleet, private_redis: RedisServer, sms_fake: FakeDysmsapi) -> None:
    """The message's run after the outage starts past its budget (here 0 s; in production an
    outage longer than BATCH_BUDGET): it must not start a send of its own, which could take
    MAX_SEND_SECONDS more and run into Celery's soft time limit (cut mid-send: maybe sent, and
    an email sent again). It queues the send as a deliver task, with a time limit of its own."""
    named = accept_together(fleet, "DiskFull")
    # the second email's deliver task fails: the SMS this dispatch sends itself is not sent yet
    broker = OutageAtPublish(private_redis, "notifier.deliver", 2)
    fleet.publisher = fleet.deps.publisher = broker
    try:
        dispatch_all(fleet.deps, named, inline_token("task-1"), budget=0.0)
    finally:
        if broker.restart is not None:
            broker.restart.join()
        broker.client.close()
    assert broker.left <= 0  # the outage did happen
    assert sms_fake.messages == []  # no send started by the run past its budget
    # the SMS (both numbers, one request) this dispatch would have sent itself: a task now
    [sms_task] = [args for _task, args, queue in broker.tasks if queue == "notifier.sms"]
    assert len(sms_task) == 2
    fleet.drain()
    ledger = fleet.deps.ledger
    assert [ledger.transaction(t).status for t in named] == ["delivered"]  # type: ignore[union-attr]
    assert sorted(m["phone"] for m in sms_fake.messages) == ["13800138000", "13900139000"]
    assert len(fleet.redis.lrange(outbox_key("email"), 0, -1)) == 2
