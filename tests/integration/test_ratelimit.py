"""Fleet-wide token buckets on a real redis-server: rates, all-or-nothing takes, contention."""

from __future__ import annotations

import math
import time
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier

import redis

from notifier.config import RateLimit
from notifier.ratelimit import Bucket, TokenBuckets
from tests.support.racing import race


def bucket(key: str, rate: float, per: float = 1.0, burst: float | None = None) -> Bucket:
    return Bucket(key, RateLimit(rate=rate, per=per, burst=burst))


def snapshot(client: redis.Redis, key: str) -> tuple[object, ...]:
    """What Redis holds for one bucket, to prove a refused take left it alone."""
    return (
        client.hgetall(f"ntf:tb:{key}"),
        client.zrange(f"ntf:tb:{key}:w", 0, -1, withscores=True),
    )


def test_burst_then_steady_refill(redis_client: redis.Redis) -> None:
    buckets = TokenBuckets(redis_client)
    sms = bucket("sms", rate=10, burst=5)  # burst < rate: the token bucket is what limits
    started = time.monotonic()
    assert all(buckets.take([sms]).allowed for _ in range(5))
    refused = buckets.take([sms])
    assert not refused.allowed
    assert refused.limiting == "sms"
    assert 0 < refused.retry_after <= 0.1  # one token at 10/s

    time.sleep(0.25)
    asked_at = time.monotonic()
    level = buckets.level(sms)
    # Refills continuously at 10/s: at least 2.5 tokens after 0.25 s, no more than elapsed allows.
    assert 2.5 - 1e-6 <= level <= 10 * (time.monotonic() - started) + 1e-6
    assert buckets.take([sms]).allowed
    assert buckets.take([sms]).allowed
    # Both came out of the bucket: what is left is the rest plus what refilled since.
    left = buckets.level(sms)
    assert left <= level - 2 + 10 * (time.monotonic() - asked_at) + 1e-6


def test_retry_after_is_when_it_is_allowed(redis_client: redis.Redis) -> None:
    buckets = TokenBuckets(redis_client)
    slow = bucket("email:ops@example.com", rate=2, burst=1)  # one token per 0.5 s
    assert buckets.take([slow]).allowed
    started = time.monotonic()
    time.sleep(0.1)
    first = buckets.take([slow])
    elapsed = time.monotonic() - started
    assert not first.allowed
    assert 0.5 - elapsed - 0.01 <= first.retry_after <= 0.4 + 1e-3

    time.sleep(first.retry_after / 4)
    early = buckets.take([slow])
    assert not early.allowed  # nothing was taken by asking early...
    assert early.retry_after < first.retry_after
    time.sleep(early.retry_after + 0.005)
    assert buckets.take([slow]).allowed  # ...and waiting what it said is enough


def test_day_budget_holds_in_any_rolling_window(redis_client: redis.Redis) -> None:
    """'5 per 2s, burst 5' is a scaled-down '50 per 1d, burst 50' recipient budget."""
    buckets = TokenBuckets(redis_client)
    day = bucket("sms:+8613800138000:day", rate=5, per=2.0, burst=5)
    started = time.monotonic()
    assert all(buckets.take([day]).allowed for _ in range(5))
    time.sleep(1.0)
    # A bare token bucket would have refilled 2.5 tokens by now, letting 7-8 through in 2 s.
    decision = buckets.take([day])
    elapsed = time.monotonic() - started
    assert not decision.allowed
    # It is allowed again when the first of the five leaves the window, 2 s after its use.
    assert 2.0 - elapsed - 1e-3 <= decision.retry_after <= 1.0 + 1e-3
    assert buckets.level(day) == 0


def test_rolling_window_gives_slots_back_one_by_one(redis_client: redis.Redis) -> None:
    buckets = TokenBuckets(redis_client)
    minute = bucket("sms:+8613900139000:min", rate=2, per=0.6)  # 2 in any 0.6 s
    assert buckets.take([minute]).allowed
    time.sleep(0.3)
    second_before = time.monotonic()
    assert buckets.take([minute]).allowed
    second_after = time.monotonic()
    refused = buckets.take([minute])
    assert not refused.allowed
    assert refused.retry_after <= 0.3 + 1e-3  # the first slot returns 0.6 s after its use
    time.sleep(refused.retry_after + 0.005)
    assert buckets.take([minute]).allowed  # the first slot came back...
    asked_before = time.monotonic()
    decision = buckets.take([minute])
    asked_after = time.monotonic()
    assert not decision.allowed  # ...but not the second, which was used 0.3 s later
    assert decision.retry_after <= 0.6 - (asked_before - second_after) + 1e-3
    assert decision.retry_after >= 0.6 - (asked_after - second_before) - 1e-3


def test_a_long_window_waits_for_exactly_the_takes_that_must_leave_it(
        redis_client: redis.Redis) -> None:
    """70 in any minute, all used: a take of 40 waits until the 40th-oldest take leaves the
    window (found by reading the window's oldest takes page by page)."""
    buckets = TokenBuckets(redis_client)
    minute = bucket("push:team", rate=70, per=60.0)
    taken = []  # (just before, just after) each take
    for _ in range(70):
        before = time.monotonic()
        assert buckets.take([minute]).allowed
        taken.append((before, time.monotonic()))
        time.sleep(0.01)  # takes 10 ms apart: a neighbour's expiry is outside the bounds below
    asked_before = time.monotonic()
    decision = buckets.take([minute], cost=40)
    asked_after = time.monotonic()
    assert not decision.allowed
    fortieth_before, fortieth_after = taken[39]
    assert 60 - (asked_after - fortieth_before) - 1e-3 <= decision.retry_after
    assert decision.retry_after <= 60 - (asked_before - fortieth_after) + 1e-3


def test_a_window_kept_by_an_older_version_still_counts(redis_client: redis.Redis) -> None:
    """Buckets written before the window's running sum was kept (no `used` field) are counted
    in full once, so an upgrade never lets a day budget through twice."""
    buckets = TokenBuckets(redis_client)
    day = bucket("sms:+8613800138000:day", rate=5, per=60.0, burst=5)
    for _ in range(3):
        assert buckets.take([day]).allowed
    redis_client.hdel("ntf:tb:sms:+8613800138000:day", "used")
    assert buckets.take([day]).allowed and buckets.take([day]).allowed
    assert not buckets.take([day]).allowed
    assert float(redis_client.hget("ntf:tb:sms:+8613800138000:day", "used") or 0) == 5.0


def test_multi_take_is_all_or_nothing(redis_client: redis.Redis) -> None:
    buckets = TokenBuckets(redis_client)
    channel = bucket("sms", rate=100, burst=100)
    minute = bucket("sms:+8613800138000:0", rate=1, per=60.0)
    day = bucket("sms:+8613800138000:1", rate=3, per=86400.0)
    assert buckets.take([channel, minute, day]).allowed
    assert buckets.level(channel) == 99

    before = {b.key: snapshot(redis_client, b.key) for b in (channel, day)}
    ttl_before = redis_client.pttl("ntf:tb:sms")
    decision = buckets.take([channel, minute, day])
    assert not decision.allowed
    assert decision.limiting == minute.key
    assert 59 <= decision.retry_after <= 60
    assert {b.key: snapshot(redis_client, b.key) for b in (channel, day)} == before
    assert redis_client.pttl("ntf:tb:sms") <= ttl_before  # expiry not pushed back either
    assert buckets.level(channel) == 99
    assert buckets.level(day) == 2

    # The wait reported is the longest one: every bucket must be able to give.
    other = bucket("sms:+8613900139000:0", rate=1, per=60.0)
    assert buckets.take([other, day]).allowed
    assert buckets.take([day]).allowed  # day budget now spent (3 of 3)
    decision = buckets.take([channel, other, day])
    assert decision.limiting == day.key
    assert decision.retry_after > 86000


def test_cost_beyond_capacity_is_never_allowed(redis_client: redis.Redis) -> None:
    buckets = TokenBuckets(redis_client)
    small = bucket("push", rate=2, burst=2)
    decision = buckets.take([small], cost=3)
    assert decision == decision.__class__(False, math.inf, "push")
    assert redis_client.keys("ntf:tb:*") == []
    assert buckets.take([small], cost=2).allowed


def test_idle_buckets_expire(redis_client: redis.Redis) -> None:
    buckets = TokenBuckets(redis_client)
    quick = bucket("quick", rate=5, per=0.2)
    assert buckets.take([quick]).allowed
    assert 0 < redis_client.pttl("ntf:tb:quick") <= 200
    assert 0 < redis_client.pttl("ntf:tb:quick:w") <= 200

    bursty = bucket("bursty", rate=1, per=1, burst=3)
    assert all(buckets.take([bursty]).allowed for _ in range(3))
    assert 2000 < redis_client.pttl("ntf:tb:bursty") <= 3000  # empty: full again in 3 s

    time.sleep(0.3)
    assert redis_client.exists("ntf:tb:quick", "ntf:tb:quick:w") == 0
    assert buckets.level(quick) == 5  # a missing key is a full bucket


def _hammer(url: str, seconds: float, barrier: Barrier, out: Queue[tuple[int, float, float]]) -> None:
    client = redis.Redis.from_url(url)
    buckets = TokenBuckets(client)
    shared = bucket("fleet", rate=10, burst=10)
    barrier.wait()
    deadline = time.time() + seconds
    granted, first = 0, math.inf
    while time.time() < deadline:
        before = time.time()
        if buckets.take([shared]).allowed:
            granted += 1
            first = min(first, before)
    out.put((granted, first, time.time()))
    client.close()


def test_limit_holds_fleet_wide_across_processes(redis_url: str) -> None:
    results = race(_hammer, 4, redis_url, 2.0)

    granted = sum(r[0] for r in results)
    elapsed = max(r[2] for r in results) - min(r[1] for r in results)
    assert sum(1 for r in results if r[0] > 0) >= 2  # the processes really competed
    # Never more than the bucket allows however many processes ask...
    assert granted <= 10 + 10 * elapsed + 1
    # ...and no tokens lost to races either. The rolling window holds back at most one
    # period's refill (10 in any 1 s), hence `elapsed - 1`.
    assert granted >= 10 + 10 * (elapsed - 1) - 1


def test_a_take_given_back_counts_against_no_limit(redis_client: redis.Redis) -> None:
    """A take whose message was never sent (the provider's breaker open) goes back to the
    bucket and leaves the rolling window, in every bucket of the take; others stay taken."""
    buckets = TokenBuckets(redis_client)
    minute, day = bucket("p:0", rate=1, per=60, burst=2), bucket("p:1", rate=3, per=86400)
    kept = buckets.take([minute, day])
    unsent = buckets.take([minute, day])
    assert kept.allowed and unsent.allowed and not buckets.take([minute, day]).allowed
    buckets.give_back([minute, day], unsent)
    assert redis_client.zcard("ntf:tb:p:0:w") == redis_client.zcard("ntf:tb:p:1:w") == 1
    assert buckets.take([minute, day]).allowed  # the slot given back, and only that one
    refused = buckets.take([minute, day])
    assert not refused.allowed and refused.limiting == "p:0"
