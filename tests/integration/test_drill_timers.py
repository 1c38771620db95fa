"""Drill timers and the scheduler on a real redis-server, pipeline inline (no Celery): a drill
step whose task failed is fired again, a step that completed removes its timer, and the other
timers (deliveries, digests) are still removed when they are published. A step whose worker is
killed mid-run (in a worker process of the test's own, SIGKILLed) counts as a failed attempt."""

from __future__ import annotations

import json
import multiprocessing as mp
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from multiprocessing.connection import Connection
from typing import Any

import pytest
import redis

from notifier.celery_app import CeleryPublisher, make_celery
from notifier.channels.sandbox import outbox_key
from notifier.drills.escalation import fire_drill_timer
from notifier.drills.markdown import render_markdown
from notifier.drills.model import DrillSpec
from notifier.drills.report import build_report
from notifier.drills.service import ATTEMPT_LIMIT, DrillService, timer_arg
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


def drill_service(fleet: InlineFleet, attempt_limit: float = ATTEMPT_LIMIT) -> DrillService:
    return DrillService(fleet.settings, fleet.redis, fleet.intake, fleet.deps.ledger,
                        fleet.deps.timers, attempt_limit=attempt_limit)


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


def alices_announcement(args: list[str]) -> bool:
    return alices_drill_sms(args) and '"body":""' in "".join(args)


def _drill_worker(redis_url: str, config: dict[str, Any], attempt_limit: float,
                  conn: Connection) -> None:
    """A worker process: runs the drill timers' steps it is sent, as the TIMER task does, and
    answers each with the step's result; running an announcement, it gets stuck at alice's send
    (a provider, Redis, the machine hanging) and says so, until told to go on or killed."""
    fleet = InlineFleet(redis_url, config)
    svc = drill_service(fleet, attempt_limit)

    def stuck() -> str:
        conn.send("stuck")
        conn.recv()
        return "went on"

    while (timer := conn.recv()) is not None:
        hang: AbstractContextManager[Any] = (
            interleaved(fleet.redis, alices_announcement, stuck) if timer.endswith(":0")
            else nullcontext())
        with hang:
            conn.send(fire_drill_timer(svc, timer.partition(":")[2]))


class DyingWorker:
    """Drill steps run in a worker process of their own (spawned: its own Redis connections, as
    a Celery worker's child), where `kill` SIGKILLs it mid-step, as the OOM killer does or the
    pool at Celery's hard time limit; a killed one is replaced, as the pool replaces it."""

    def __init__(self, redis_url: str, config: dict[str, Any], attempt_limit: float) -> None:
        self.args = (redis_url, config, attempt_limit)
        self.ctx = mp.get_context("spawn")
        self.kills = 0
        self._start()

    def _start(self) -> None:
        self.conn, theirs = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=_drill_worker, args=(*self.args, theirs),
                                     daemon=True)
        self.proc.start()

    def fire(self, timer: str) -> str:
        """The step's result, or "stuck" (it is still running, stuck at alice's send)."""
        self.conn.send(timer)
        return self._answer()

    def go_on(self) -> str:
        self.conn.send("go on")
        return self._answer()

    def _answer(self) -> str:
        assert self.conn.poll(30), "the worker process did not answer"
        answer: str = self.conn.recv()
        return answer

    def kill(self) -> None:
        self.proc.kill()  # SIGKILL: no except, no finally, nothing more runs in it
        self.proc.join(10)
        self.kills += 1
        self._start()

    def close(self) -> None:
        self.proc.kill()
        self.proc.join(10)


def test_a_drill_step_whose_worker_dies_every_time_is_counted_backed_off_and_given_up(
        make_fleet: MakeFleet, redis_url: str) -> None:
    limit = 3.0  # the worker's hard time limit and margin (ATTEMPT_LIMIT: 70 s by default)
    fleet = make_fleet(TWO)
    svc = drill_service(fleet, limit)
    worker = DyingWorker(redis_url, TWO, limit)
    try:
        drill = svc.create(DrillSpec.model_validate(
            {**SPEC, "operators": ["alice", "bob"],
             "phases": [{"name": "primary stopped", "deadline": "10s"}]}))
        publisher = ListPublisher()
        scheduler = Scheduler(fleet.redis, publisher, timer_lease=0.2)
        runs: list[tuple[float, int, str]] = []  # (when, round, result)

        def run(arg: str, copy: str = "") -> None:
            result = worker.fire(arg)
            if result == "stuck":  # killed mid-step, every time
                worker.kill()
                result = "killed"
            runs.append((time.time(), int(arg.rsplit(":", 1)[1]), copy + result))
            if result == "killed" and not copy:
                # Celery puts a killed worker's task back on the queue at once
                # (task_reject_on_worker_lost): a copy of the step runs again right away.
                run(arg, "redelivered: ")

        def misses_recorded() -> bool:
            scheduler.tick()
            while publisher.tasks:
                _task, [arg], _queue = publisher.tasks.pop(0)
                run(arg)
            return any(round_ == 2 and r == "missed" for _at, round_, r in runs)

        wait_until(misses_recorded, timeout=60)
    finally:
        worker.close()
    announce = [(at, result) for at, round_, result in runs if round_ == 0]
    outcomes = [r for _at, r in announce if r != "busy"]
    # Every attempt died; each death was counted once, by the first copy to find it past the
    # time limit; the attempts were retried after a backoff, then given up. The copy Celery
    # redelivered at once did not run the step again (it would have died too): the attempt
    # might still have been running (busy), or, past the limit, it was counted.
    assert outcomes[0] == "killed" and outcomes[-1] == "given_up", outcomes
    redelivered = [r for r in outcomes if r.startswith("redelivered")]
    assert len(redelivered) == worker.kills, outcomes
    assert set(redelivered) <= {"redelivered: busy", "redelivered: retry"}, outcomes
    assert len([r for r in outcomes if r.endswith("retry")]) == worker.kills - 1 >= 1, outcomes
    timeline = svc.store.timeline(drill.id)
    failed = [e for e in timeline if e["event"] == "step_failed"]
    (given_up,) = [e for e in timeline if e["event"] == "step_given_up"]
    assert [f["failure"] for f in failed] == list(range(1, worker.kills))
    assert given_up["failures"] == worker.kills and given_up["step"] == "announce"
    assert all("did not finish" in e["error"] for e in [*failed, given_up]), failed
    # Backed off: the next attempt waited for the retry (5 s, unless the give-up comes sooner),
    # not for the scheduler's 0.2 s lease.
    assert failed[0]["retry_in"] >= 2.0, failed
    retried_at = [at for at, r in announce if r.endswith("retry")]
    killed_at = [at for at, r in announce if r == "killed"]
    for f, at, next_attempt in zip(failed, retried_at, killed_at[1:], strict=True):
        assert next_attempt - at >= f["retry_in"] - 0.5, (f, announce)
    # The next rounds ran: alice and bob reminded, carol told, the misses recorded.
    assert [r for _at, round_, r in runs if round_ > 0 and r != "busy"] == ["escalated",
                                                                           "missed"], runs
    assert timers(fleet.redis) == []
    report = build_report(svc, drill.id)
    (phase,) = report["phases"]
    (failing,) = phase["failed_steps"]
    assert (failing["round"], failing["step"], failing["failures"], failing["retrying"]) == (
        0, "announce", worker.kills, False)
    assert "did not finish" in failing["error"]
    ops = {op["operator"]: op for op in phase["operators"]}
    assert [len(op["escalations"]) for op in ops.values()] == [1, 1]
    assert {op["result"] for op in ops.values()} == {"missed"}
    assert [e["to"] for e in phase["escalation_recipients"]] == [["carol"]]
    assert any("announce" in f and "given up" in f for f in report["summary"]["flags"])
    assert "did not finish" in render_markdown(report)


def test_a_slow_attempt_still_running_is_not_taken_for_dead_by_a_copy(
        make_fleet: MakeFleet, redis_url: str) -> None:
    limit = 5.0
    fleet = make_fleet(TWO)
    svc = drill_service(fleet, limit)
    worker = DyingWorker(redis_url, TWO, limit)
    try:
        drill = svc.create(DrillSpec.model_validate({**SPEC, "operators": ["alice", "bob"]}))
        publisher = ListPublisher()
        scheduler = Scheduler(fleet.redis, publisher, timer_lease=0.2)
        assert scheduler.tick() == 1
        [(_task, [arg], _queue)] = publisher.tasks
        assert worker.fire(arg) == "stuck"  # slow: stuck at alice's send, but alive
        started = time.time()  # the attempt started before this
        time.sleep(0.5)
        assert scheduler.tick() == 1  # the lease ran out: a copy is published, and runs
        (_task, [copy], _queue) = publisher.tasks[1]
        assert fire_drill_timer(svc, copy.partition(":")[2]) == "busy"
        assert fire_timer(fleet.deps, copy) == "busy"  # another worker's copy, the same
        state = svc.store.state(drill.id)
        assert not [e for e in svc.store.timeline(drill.id) if e["event"] == "step_failed"]
        assert "p0:r0:failures" not in state
        # The timer stays, to look again by the time the attempt must have ended, no later.
        member = Timer(TIMER, CONTROL_QUEUE, arg, 0).member
        assert fleet.redis.zscore(TIMERS, member) <= started + limit
        assert worker.go_on() == "announced"
    finally:
        worker.close()
    assert timers(fleet.redis) == [timer_arg(drill.id, 0, 1)]
    assert "p0:r0:attempt" not in svc.store.state(drill.id)
    assert not [e for e in svc.store.timeline(drill.id) if e["event"] == "step_failed"]
    announced = [s["operator"] for s in svc.store.sends(drill.id) if s["step"] == "announce"]
    assert announced == ["alice", "bob"]
    assert fire_drill_timer(svc, f"{drill.id}:0:0") == "announced"  # a later copy: a re-run


def test_copies_that_find_the_same_dead_attempt_count_it_once(make_fleet: MakeFleet,
                                                               redis_url: str) -> None:
    limit = 0.5
    fleets = [make_fleet(TWO) for _ in range(4)]
    svc = drill_service(fleets[0], limit)
    worker = DyingWorker(redis_url, TWO, limit)
    try:
        drill = svc.create(DrillSpec.model_validate({**SPEC, "operators": ["alice", "bob"]}))
        assert worker.fire(timer_arg(drill.id, 0, 0)) == "stuck"
        worker.kill()
    finally:
        worker.close()
    time.sleep(limit)
    barrier = threading.Barrier(len(fleets))
    results: list[str] = []

    def copy(fleet: InlineFleet) -> None:
        barrier.wait()
        results.append(fire_drill_timer(drill_service(fleet, limit), f"{drill.id}:0:0"))

    threads = [threading.Thread(target=copy, args=(f,)) for f in fleets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results.count("retry") == 1, results  # the one copy that found it dead
    assert set(results) <= {"retry", "busy", "announced"}, results
    failed = [e for e in svc.store.timeline(drill.id) if e["event"] == "step_failed"]
    assert [f["failure"] for f in failed] == [1], failed
