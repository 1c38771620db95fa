"""Fleet-shared circuit breakers on a real redis-server, including Redis going away."""

from __future__ import annotations

import time
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier

import pybreaker
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from notifier.breaker import (
    BreakerState,
    FleetBreaker,
    Permit,
    breaker_events,
    list_breakers,
)
from notifier.config import BreakerPolicy
from notifier.errors import CircuitOpen
from tests.support.racing import race
from tests.support.servers import RedisServer

POLICY = BreakerPolicy(fail_max=3, reset_timeout=0.3, half_open_trials=1)


def fail(breaker: FleetBreaker, times: int) -> None:
    for _ in range(times):
        breaker.record_failure(breaker.acquire())


def open_breaker(breaker: FleetBreaker) -> None:
    fail(breaker, breaker.policy.fail_max)
    assert breaker.status().state is BreakerState.OPEN


def test_opens_after_fail_max_consecutive_failures(redis_client: redis.Redis) -> None:
    breaker = FleetBreaker(redis_client, "sms:aliyun", POLICY)
    fail(breaker, 2)
    breaker.record_success(breaker.acquire())  # not consecutive any more
    fail(breaker, 2)
    assert breaker.status().state is BreakerState.CLOSED
    assert breaker.status().failures == 2

    breaker.record_failure(breaker.acquire())
    status = breaker.status()
    assert status.state is BreakerState.OPEN
    assert status.opened_at is not None and status.retry_at is not None
    assert status.retry_at - status.opened_at == pytest.approx(0.3, abs=1e-5)
    with pytest.raises(CircuitOpen) as refused:
        breaker.acquire()
    assert refused.value.breaker == "sms:aliyun"
    assert refused.value.retry_after is not None and 0 < refused.value.retry_after <= 0.3

    [(_, event)] = breaker_events(redis_client)
    assert event["breaker"] == "sms:aliyun"
    assert (event["from"], event["to"], event["failures"]) == ("closed", "open", "3")


def peeked(breaker: FleetBreaker) -> Permit | None:
    pipe = breaker._redis.pipeline(transaction=False)
    answer = breaker.queue_peek(pipe)
    return answer(pipe.execute())


def test_a_state_read_gives_the_permit_acquire_would_only_where_acquire_just_reads(
    redis_client: redis.Redis,
) -> None:
    # What a send reads along with its rate-limit take: in CLOSED (also never used) and
    # FORCED_CLOSED the permit acquire gives; anywhere else None, so the caller must acquire.
    breaker = FleetBreaker(redis_client, "push:fcm", POLICY)
    assert peeked(breaker) == breaker.acquire() == Permit("push:fcm", 0, False)
    fail(breaker, 1)
    assert peeked(breaker) == breaker.acquire()  # failures counted, still closed
    fail(breaker, 2)
    assert peeked(breaker) is None  # open: acquire refuses
    time.sleep(0.35)
    assert peeked(breaker) is None  # due for half-open: only acquire moves it and hands a trial
    trial = breaker.acquire()
    assert trial.trial and peeked(breaker) is None  # half-open: trials are counted by acquire
    breaker.record_success(trial)
    closed = breaker.acquire()
    assert peeked(breaker) == closed and closed.generation > trial.generation
    breaker.force_open("ops", "maintenance")
    assert peeked(breaker) is None
    breaker.force_close("ops", "provider says fine")
    assert peeked(breaker) == breaker.acquire()
    assert peeked(breaker) != Permit("push:fcm", 0, False)  # the generation moved with each change


def test_half_open_trial_success_closes(redis_client: redis.Redis) -> None:
    breaker = FleetBreaker(redis_client, "email:smtp", POLICY)
    open_breaker(breaker)
    time.sleep(0.35)
    trial = breaker.acquire()
    assert trial.trial
    assert breaker.status().state is BreakerState.HALF_OPEN
    with pytest.raises(CircuitOpen):
        breaker.acquire()  # the one trial slot is taken
    breaker.record_success(trial)
    status = breaker.status()
    assert (status.state, status.failures, status.opened_at) == (BreakerState.CLOSED, 0, None)
    assert not breaker.acquire().trial
    transitions = [(e["from"], e["to"]) for _, e in breaker_events(redis_client)]
    assert transitions == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]


def test_half_open_trial_failure_reopens(redis_client: redis.Redis) -> None:
    breaker = FleetBreaker(redis_client, "push:fcm", POLICY)
    open_breaker(breaker)
    first_open = breaker.status().opened_at
    time.sleep(0.35)
    breaker.record_failure(breaker.acquire())
    status = breaker.status()
    assert status.state is BreakerState.OPEN
    assert status.opened_at is not None and first_open is not None
    assert status.opened_at > first_open  # a fresh reset_timeout starts now
    with pytest.raises(CircuitOpen):
        breaker.acquire()


def test_results_of_calls_admitted_before_a_transition_are_ignored(
    redis_client: redis.Redis,
) -> None:
    breaker = FleetBreaker(redis_client, "sms:aliyun", POLICY)
    slow_call = breaker.acquire()  # admitted while closed, answers much later
    open_breaker(breaker)
    time.sleep(0.35)
    trial = breaker.acquire()
    breaker.record_success(slow_call)  # says nothing about the provider *now*
    assert breaker.status().state is BreakerState.HALF_OPEN
    breaker.record_failure(trial)
    assert breaker.status().state is BreakerState.OPEN


def test_trial_permit_of_a_dead_worker_expires(redis_client: redis.Redis) -> None:
    breaker = FleetBreaker(redis_client, "sms:aliyun", POLICY, trial_ttl=0.3)
    open_breaker(breaker)
    time.sleep(0.35)
    breaker.acquire()  # this worker dies and never reports
    with pytest.raises(CircuitOpen) as refused:
        breaker.acquire()
    assert refused.value.retry_after is not None and refused.value.retry_after <= 0.3
    time.sleep(0.35)
    breaker.record_success(breaker.acquire())
    assert breaker.status().state is BreakerState.CLOSED


def _race_for_trial(url: str, barrier: Barrier, out: Queue[Permit | None]) -> None:
    client = redis.Redis.from_url(url)
    policy = BreakerPolicy(fail_max=3, reset_timeout=0.3, half_open_trials=2)
    breaker = FleetBreaker(client, "sms:aliyun", policy)
    barrier.wait()
    try:
        out.put(breaker.acquire())
    except CircuitOpen:
        out.put(None)
    client.close()


def test_half_open_admits_exactly_the_trials_fleet_wide(redis_client: redis.Redis, redis_url: str) -> None:
    policy = BreakerPolicy(fail_max=3, reset_timeout=0.3, half_open_trials=2)
    breaker = FleetBreaker(redis_client, "sms:aliyun", policy)
    open_breaker(breaker)
    time.sleep(0.35)  # due for half-open: the racers also race to make that transition
    results = race(_race_for_trial, 4, redis_url)

    permits = [p for p in results if p is not None]
    assert len(permits) == 2
    assert all(p.trial for p in permits)
    assert len({p.id for p in permits}) == 2
    with pytest.raises(CircuitOpen):
        breaker.acquire()
    breaker.record_success(permits[0])  # a permit travels: any worker may report it
    assert breaker.status().state is BreakerState.CLOSED
    breaker.record_failure(permits[1])  # the other trial's verdict came too late to count
    assert breaker.status().state is BreakerState.CLOSED


def test_state_is_shared_between_instances_and_connections(redis_url: str) -> None:
    one, two = redis.Redis.from_url(redis_url), redis.Redis.from_url(redis_url)
    try:
        a, b = FleetBreaker(one, "email:smtp", POLICY), FleetBreaker(two, "email:smtp", POLICY)
        a.record_failure(a.acquire())
        b.record_failure(b.acquire())
        assert a.status().failures == 2
        a.record_failure(b.acquire())  # a permit is not tied to the instance that issued it
        with pytest.raises(CircuitOpen):
            b.acquire()
        FleetBreaker(one, "sms:aliyun", POLICY).acquire()
        assert [(s.name, s.state) for s in list_breakers(two)] == [
            ("email:smtp", BreakerState.OPEN),
            ("sms:aliyun", BreakerState.CLOSED),
        ]
    finally:
        one.close()
        two.close()


def test_operators_force_and_reset_with_history(redis_client: redis.Redis) -> None:
    breaker = FleetBreaker(redis_client, "sms:aliyun", POLICY)
    status = breaker.force_open("alice", "Aliyun maintenance 02:00-03:00")
    assert (status.state, status.changed_by) == (BreakerState.FORCED_OPEN, "alice")
    time.sleep(0.35)  # no reset_timeout for an operator's decision
    with pytest.raises(CircuitOpen) as refused:
        breaker.acquire()
    assert refused.value.retry_after is None

    breaker.force_close("bob", "provider says all clear; ignore the noise")
    fail(breaker, 10)
    status = breaker.status()
    assert (status.state, status.failures, status.reason) == (
        BreakerState.FORCED_CLOSED,
        0,
        "provider says all clear; ignore the noise",
    )

    status = breaker.reset("carol")
    assert (status.state, status.failures, status.changed_by) == (BreakerState.CLOSED, 0, "carol")
    open_breaker(breaker)  # automatic again

    history = breaker.history()
    assert [(h["action"], h["by"], h["from"], h["to"]) for h in history] == [
        ("force_open", "alice", "closed", "forced_open"),
        ("force_close", "bob", "forced_open", "forced_closed"),
        ("reset", "carol", "forced_closed", "closed"),
    ]
    assert history[0]["reason"] == "Aliyun maintenance 02:00-03:00"
    assert float(history[0]["at"]) <= float(history[2]["at"])
    for _ in range(110):
        breaker.reset("loop")
    assert len(breaker.history()) == 100


def quick_client(server: RedisServer) -> redis.Redis:
    """Gives up fast when Redis is gone (the default client retries for seconds)."""
    return redis.Redis(port=server.port, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 1))


def test_redis_down_refuses_calls_and_keeps_state(private_redis: RedisServer) -> None:
    client = quick_client(private_redis)
    tripped = FleetBreaker(client, "sms:aliyun", BreakerPolicy(fail_max=2, reset_timeout=600))
    healthy = FleetBreaker(client, "email:smtp", POLICY)
    fail(tripped, 2)
    healthy_failures = healthy.acquire()
    healthy.record_failure(healthy_failures)
    before = tripped.status()

    private_redis.stop()
    for breaker in (tripped, healthy):
        with pytest.raises(redis.ConnectionError):
            breaker.acquire()  # neither a permit nor a guess
    with pytest.raises(redis.ConnectionError):
        healthy.record_failure(healthy_failures)

    private_redis.start()  # same port, state from the append-only file
    assert tripped.status() == before
    assert healthy.status().failures == 1
    with pytest.raises(CircuitOpen):
        tripped.acquire()
    client.close()


def test_pybreaker_redis_storage_lets_calls_through_when_redis_is_down(
    private_redis: RedisServer,
) -> None:
    """Why breaker.py does not use pybreaker's CircuitRedisStorage (DESIGN.md §4)."""
    client = quick_client(private_redis)
    storage = pybreaker.CircuitRedisStorage(pybreaker.STATE_CLOSED, client)
    stock = pybreaker.CircuitBreaker(fail_max=1, reset_timeout=600, state_storage=storage)
    calls: list[str] = []

    def provider(fails: bool) -> None:
        calls.append("called")
        if fails:
            raise TimeoutError("provider down")

    with pytest.raises(pybreaker.CircuitBreakerError):
        stock.call(provider, True)
    assert client.get("pybreaker:state") == b"open"
    with pytest.raises(pybreaker.CircuitBreakerError):
        stock.call(provider, False)  # open: refused without a call
    assert calls == ["called"]

    private_redis.stop()
    stock.call(provider, False)  # Redis error -> fallback_circuit_state "closed" -> called
    assert calls == ["called", "called"]
    client.close()
