"""Drill timers and the scheduler on a real redis-server, pipeline inline (no Celery): a drill
step whose task failed is fired again, a step that completed removes its timer, and the other
timers (deliveries, digests) are still removed when they are published."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from notifier.celery_app import CeleryPublisher, make_celery
from notifier.drills.escalation import fire_drill_timer
from notifier.drills.model import DrillSpec
from notifier.drills.report import build_report
from notifier.drills.service import DrillService, timer_arg
from notifier.scheduler import TIMERS, Scheduler, Timer, Timers
from notifier.tasks_spec import CONTROL_QUEUE, DELIVER, DIGEST, TIMER, deliver_queue
from notifier.worker.timers import fire_timer
from tests.support.inline import InlineFleet, ListPublisher
from tests.support.interleave import interleaved
from tests.support.servers import RedisServer, free_port, wait_until

CONFIG: dict[str, Any] = {
    "channels": {"sms": {"provider": "sandbox"}, "email": {"provider": "sandbox"}},
    "recipients": {"alice": {"phone": "+8613800138000", "email": "alice@example.com"},
                   "carol": {"email": "carol@example.com"}},
    "routes": [{"match": {}, "to": ["carol"], "channels": ["sms"], "fallback": ["email"]}],
}
SPEC = {"name": "DR", "operators": ["alice"], "phases": ["primary stopped"],
        "escalation": ["carol"], "escalation_rounds": 1, "start": True}


def drill_service(fleet: InlineFleet) -> DrillService:
    return DrillService(fleet.settings, fleet.redis, fleet.intake, fleet.deps.ledger,
                        fleet.deps.timers)


def timers(client: redis.Redis) -> list[str]:
    return [m.decode().split("|", 2)[2] for m in client.zrange(TIMERS, 0, -1)]


@pytest.fixture
def fleet(redis_url: str) -> Iterator[InlineFleet]:
    fleet = InlineFleet(redis_url, CONFIG)
    yield fleet
    fleet.close()


def test_a_drill_step_whose_task_failed_is_fired_again(private_redis: RedisServer) -> None:
    fleet = InlineFleet(private_redis.url, CONFIG)
    try:
        svc = drill_service(fleet)
        drill = svc.create(DrillSpec.model_validate(SPEC))
        publisher = ListPublisher()
        scheduler_redis = redis.Redis.from_url(private_redis.url)
        scheduler = Scheduler(scheduler_redis, publisher, timer_lease=0.5)
        assert scheduler.tick() == 1  # the announcement's task is published...
        [(task, [arg], queue)] = publisher.tasks
        private_redis.stop()  # ...and Redis restarts while a worker runs it
        with pytest.raises(redis.RedisError):
            fire_timer(fleet.deps, arg)  # the Celery task fails: acked, never redelivered
        private_redis.start()
        for client in (fleet.redis, scheduler_redis):
            client.connection_pool.disconnect()
        assert svc.store.is_live(drill.id, 0) and not svc.store.sends(drill.id)

        def refired() -> bool:
            scheduler.tick()
            return len(publisher.tasks) == 2

        wait_until(refired, timeout=5)  # once its lease ran out
        assert publisher.tasks[1] == (task, [arg], queue)
        assert fire_timer(fleet.deps, arg) == "announced"
        # Completed: the step removed its own timer; the first escalation round is what is left.
        assert timers(fleet.redis) == [timer_arg(drill.id, 0, 1)]
        assert len([s for s in svc.store.sends(drill.id) if s["step"] == "announce"]) == 1
    finally:
        fleet.close()


def test_every_completed_drill_step_removes_its_timer(fleet: InlineFleet) -> None:
    svc = drill_service(fleet)
    drill = svc.create(DrillSpec.model_validate(SPEC))
    scheduler = Scheduler(fleet.redis, ListPublisher())
    scheduler.tick()  # leases the announcement: still there until its step completes
    assert timers(fleet.redis) == [timer_arg(drill.id, 0, 0)]
    for round_, result in ((0, "announced"), (1, "escalated"), (2, "missed")):
        assert fire_drill_timer(svc, f"{drill.id}:0:{round_}") == result
        later = [timer_arg(drill.id, 0, round_ + 1)] if round_ < 2 else []
        assert timers(fleet.redis) == later
    # A timer of a drill that no longer exists, or of a kind nobody handles, goes too.
    Timers(fleet.redis).schedule(TIMER, CONTROL_QUEUE, "drill:dr-gone:0:1", 0.0)
    Timers(fleet.redis).schedule(TIMER, CONTROL_QUEUE, "fax:x", 0.0)
    assert fire_timer(fleet.deps, "drill:dr-gone:0:1") == "missing"
    assert fire_timer(fleet.deps, "fax:x").startswith("unknown timer kind")
    assert timers(fleet.redis) == []


def test_delivery_and_digest_timers_are_still_removed_when_published(fleet: InlineFleet
                                                                     ) -> None:
    publisher = ListPublisher()
    due = [Timer(DELIVER, deliver_queue("sms"), "tx-1.0", 1.0),
           Timer(DIGEST, deliver_queue("sms"), "sms|+8613800138000", 1.0),
           Timer(TIMER, CONTROL_QUEUE, "drill:dr-x:0:1", 1.0)]
    for timer in due:
        Timers(fleet.redis).schedule(timer.task, timer.queue, timer.arg, timer.due)
    assert Scheduler(fleet.redis, publisher).tick() == 3
    assert sorted(publisher.tasks) == sorted((t.task, [t.arg], t.queue) for t in due)
    assert timers(fleet.redis) == ["drill:dr-x:0:1"]  # leased: due again in a minute
    assert fleet.redis.zscore(TIMERS, due[2].member) > 50.0 + float(fleet.redis.time()[0])


def test_the_scheduler_outlives_a_broker_it_cannot_publish_to(redis_client: redis.Redis) -> None:
    Timers(redis_client).schedule(TIMER, CONTROL_QUEUE, "drill:dr-x:0:1", time.time())
    dead_broker = CeleryPublisher(make_celery(f"redis://127.0.0.1:{free_port()}/0"))
    ticks = iter(range(2))
    scheduler = Scheduler(redis_client, dead_broker, interval=0.05)
    scheduler.run_forever(stop=lambda: next(ticks, None) is None)  # must not raise
    assert timers(redis_client) == ["drill:dr-x:0:1"]  # still owed: fired once it can publish
    assert redis_client.zscore(TIMERS, Timer(TIMER, CONTROL_QUEUE, "drill:dr-x:0:1", 0).member
                               ) <= time.time()


def test_a_send_recorded_half_way_is_still_in_the_report_after_the_step_is_refired(
        fleet: InlineFleet) -> None:
    svc = drill_service(fleet)
    drill = svc.create(DrillSpec.model_validate(SPEC))

    def redis_fails() -> str:
        raise redis.ConnectionError("failover")

    # Redis fails over right after the announcement's transaction was noted on the drill,
    # before the send itself was recorded: the task fails, the timer fires again.
    with interleaved(fleet.redis, lambda args: any("|tx:announce" in a for a in args),
                     redis_fails, after=True), pytest.raises(redis.ConnectionError):
        fire_drill_timer(svc, f"{drill.id}:0:0")
    assert fire_drill_timer(svc, f"{drill.id}:0:0") == "announced"
    fleet.drain()
    (alice,) = build_report(svc, drill.id)["phases"][0]["operators"]
    assert alice["announce_transaction"] is not None, "the announcement went out unrecorded"
    assert alice["accepted"]["status"] == "ok", alice["accepted"]
    events = [e["event"] for e in svc.store.timeline(drill.id)]
    assert events.count("announce") == 1, events
