"""Drill timers and the scheduler on a real redis-server, pipeline inline (no Celery): a drill
step whose task failed is fired again, a step that completed removes its timer, and the other
timers (deliveries, digests) are still removed when they are published."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import redis

from notifier.celery_app import CeleryPublisher, make_celery
from notifier.channels.sandbox import outbox_key
from notifier.drills.escalation import fire_drill_timer
from notifier.drills.markdown import render_markdown
from notifier.drills.model import DrillSpec
from notifier.drills.report import build_report
from notifier.drills.service import DrillService, timer_arg
from notifier.scheduler import TIMERS, Scheduler, Timer, Timers
from notifier.tasks_spec import CONTROL_QUEUE, DELIVER, DIGEST, TIMER, deliver_queue
from notifier.worker.timers import fire_timer
from tests.integration.conftest import MakeFleet
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
                     redis_fails, after=True):
        assert fire_drill_timer(svc, f"{drill.id}:0:0") == "retry"
    assert fire_drill_timer(svc, f"{drill.id}:0:0") == "announced"
    fleet.drain()
    (alice,) = build_report(svc, drill.id)["phases"][0]["operators"]
    assert alice["announce_transaction"] is not None, "the announcement went out unrecorded"
    assert alice["accepted"]["status"] == "ok", alice["accepted"]
    events = [e["event"] for e in svc.store.timeline(drill.id)]
    assert events.count("announce") == 1, events


TWO = {**CONFIG, "recipients": {**CONFIG["recipients"], "bob": {"phone": "+8613900139000"}}}


@contextmanager
def refused(client: redis.Redis, matches: Callable[[list[str]], bool], error: Exception
            ) -> Iterator[None]:
    """Within the block, every command on `client` whose arguments (as text) `matches` fails
    with `error` (the test's client is wrapped, not notifier's code): a step that always fails."""
    forward: Callable[..., Any] = client.execute_command

    def execute_command(*args: Any, **options: Any) -> Any:
        if matches([str(a) for a in args]):
            raise error
        return forward(*args, **options)

    client.execute_command = execute_command  # type: ignore[method-assign]
    try:
        yield
    finally:
        del client.execute_command


def alices_drill_sms(args: list[str]) -> bool:
    """The accept of any drill message to alice (her announcement, her reminders)."""
    return any('"kind":"drill"' in a and '"to":["alice"]' in a for a in args)


ALWAYS_FAILING = [redis.ResponseError("OOM command not allowed when used memory > 'maxmemory'"),
                  RuntimeError("no free reply code after 50 tries: too many live codes")]


@pytest.mark.parametrize("error", ALWAYS_FAILING, ids=["refused-by-redis", "raises"])
def test_a_failing_drill_step_backs_off_and_the_failures_show(make_fleet: MakeFleet,
                                                              error: Exception) -> None:
    fleet = make_fleet(TWO)
    svc = drill_service(fleet)
    drill = svc.create(DrillSpec.model_validate({**SPEC, "operators": ["alice", "bob"]}))
    with refused(fleet.redis, alices_drill_sms, error):
        for _ in range(4):  # as the scheduler would re-fire it, each time it comes due
            assert fire_drill_timer(svc, f"{drill.id}:0:0") == "retry"
    failures = [e for e in svc.store.timeline(drill.id) if e["event"] == "step_failed"]
    assert [f["failure"] for f in failures] == [1, 2, 3, 4]
    delays = [f["retry_in"] for f in failures]
    assert delays == sorted(delays) and delays[-1] >= 4 * delays[0], f"no backoff: {delays}"
    assert all(f["step"] == "announce" and f["error"] for f in failures)
    # The timer waits for the last backoff, not for the scheduler's one-minute lease.
    member = Timer(TIMER, CONTROL_QUEUE, timer_arg(drill.id, 0, 0), 0).member
    assert fleet.redis.zscore(TIMERS, member) > time.time() + delays[-1] - 5
    # alice's failure kept nobody else unpaged: bob was announced, once.
    announced = [s["operator"] for s in svc.store.sends(drill.id) if s["step"] == "announce"]
    assert announced == ["bob"]
    # The drill's live report says so now, not only once the step is given up: the drill lead
    # watching it must see that alice was never announced to.
    report = build_report(svc, drill.id)
    (failing,) = report["phases"][0]["failed_steps"]
    assert (failing["step"], failing["failures"], failing["retrying"]) == ("announce", 4, True)
    assert any("announce" in f and "retrying" in f for f in report["summary"]["flags"])


@pytest.mark.parametrize("error", ALWAYS_FAILING, ids=["refused-by-redis", "raises"])
def test_a_drill_step_that_always_fails_is_given_up_and_the_drill_still_ends_with_its_report(
        make_fleet: MakeFleet, error: Exception) -> None:
    fleet = make_fleet(TWO)
    svc = drill_service(fleet)
    drill = svc.create(DrillSpec.model_validate(
        {**SPEC, "operators": ["alice", "bob"], "phases": [{"name": "primary stopped",
                                                            "deadline": "1s"}]}))
    publisher = ListPublisher()
    scheduler = Scheduler(fleet.redis, publisher)
    results: list[str] = []

    def misses_recorded() -> bool:
        scheduler.tick()
        while publisher.tasks:
            _task, [arg], _queue = publisher.tasks.pop(0)
            results.append(fire_timer(fleet.deps, arg))
        return "missed" in results

    with refused(fleet.redis, alices_drill_sms, error):
        wait_until(misses_recorded, timeout=20)
    assert results.count("given_up") == 2, results  # the announcement, then the one reminder
    assert timers(fleet.redis) == [], "a given-up step is still re-fired"
    report = build_report(svc, drill.id)
    (phase,) = report["phases"]
    assert [(f["round"], f["step"]) for f in phase["failed_steps"]] == [(0, "announce"),
                                                                        (1, "escalation")]
    assert all(f["failures"] >= 1 and f["error"] for f in phase["failed_steps"])
    # The others were still paged and the escalation recipients still told, on time.
    ops = {op["operator"]: op for op in phase["operators"]}
    assert ops["bob"]["announce_transaction"] is not None
    assert [e["to"] for e in phase["escalation_recipients"]] == [["carol"]]
    assert {op["result"] for op in ops.values()} == {"missed"}
    assert report["summary"]["result"] == "fail"
    assert any("announce" in f and "given up" in f for f in report["summary"]["flags"])
    assert "given up" in render_markdown(report)
    assert json.dumps(report)  # the report stays JSON for machines


def test_a_control_queue_backlog_piles_up_one_copy_per_lease_and_the_copies_page_no_one_twice(
        fleet: InlineFleet) -> None:
    svc = drill_service(fleet)
    drill = svc.create(DrillSpec.model_validate(SPEC))
    publisher = ListPublisher()
    scheduler = Scheduler(fleet.redis, publisher, timer_lease=0.05)

    def copies_queued(n: int) -> Callable[[], bool]:
        def check() -> bool:
            scheduler.tick()
            return len(publisher.tasks) >= n
        return check

    # No worker takes the control queue: every lease that runs out queues one more copy, and
    # only of the one timer the phase has pending.
    wait_until(copies_queued(4), timeout=10)
    assert {args[0] for _task, args, _queue in publisher.tasks} == {timer_arg(drill.id, 0, 0)}
    results = [fire_timer(fleet.deps, args[0]) for _task, args, _queue in publisher.tasks]
    assert set(results) == {"announced"}
    fleet.take_queued_dispatches()  # the workers' intake queued them on Redis
    fleet.drain()
    assert [s["step"] for s in svc.store.sends(drill.id)] == ["announce"]
    assert fleet.redis.llen(outbox_key("sms")) == 1  # alice got one SMS
    events = [e["event"] for e in svc.store.timeline(drill.id)]
    assert events.count("announce") == 1
