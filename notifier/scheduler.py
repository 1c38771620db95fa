"""Timers in a Redis ZSET (retries, deferrals, drill deadlines), fired by one leader process.

Long waits never become Celery ETA tasks: on Redis those are redelivered and duplicated once
they outlive the visibility timeout (kombu#337, celery#4400).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

import redis

from notifier.errors import BrokerUnavailable
from notifier.ledger_scripts import MOVE_IF_UNCHANGED
from notifier.tasks_spec import TIMER, Publisher

TIMERS = "ntf:timers"
LEADER = "ntf:scheduler:leader"
# How long a published TIMER task has to finish its step (and remove its timer) before the
# timer fires again: longer than a step takes (task_time_limit, 60 s by default), far shorter
# than the broker's visibility timeout, so a task that failed is retried within a minute.
# While the control queue is backlogged, a waiting timer is published again each lease: one
# copy a minute per live drill phase, each an idempotent re-run that sends nothing; not holding
# it back is what re-publishes a copy that a failover lost (docs/drills.md).
TIMER_LEASE = 60.0
log = logging.getLogger(__name__)

_POP_DUE = """
local items = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'WITHSCORES', 'LIMIT', 0, ARGV[2])
return items
"""
# KEYS: the timer set. ARGV: member, due, now. Set it unless one is set already that is not
# due yet: a due one may be firing right now, and the scheduler removes what it fired unless
# its score changed, so leaving it would let that removal take this timer too.
_SCHEDULE_KEEP = """
local current = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not current or tonumber(current) <= tonumber(ARGV[3]) then
  redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
end
"""
# KEYS: the timer set. ARGV: member, due. Move a timer that is set to fire later than `due` to
# `due`; one that is gone (its step completed and removed it) or due sooner stays as it is.
_HASTEN = """
local current = redis.call('ZSCORE', KEYS[1], ARGV[1])
if current and tonumber(current) > tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
end
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) and 1 or 0
"""


@dataclass(frozen=True)
class Timer:
    task: str
    queue: str
    arg: str
    due: float

    @property
    def member(self) -> str:
        return f"{self.task}|{self.queue}|{self.arg}"


class Timers:
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._pop = client.register_script(_POP_DUE)
        self._settle = client.register_script(MOVE_IF_UNCHANGED)
        self._schedule_keep = client.register_script(_SCHEDULE_KEEP)
        self._hasten = client.register_script(_HASTEN)

    def schedule(self, task: str, queue: str, arg: str, due: float, *, keep_existing: bool = False
                 ) -> None:
        """Set a timer; `keep_existing` leaves an already scheduled one as it is, unless that
        one is due already (being fired: see _SCHEDULE_KEEP)."""
        member = Timer(task, queue, arg, due).member
        if keep_existing:
            self._schedule_keep(keys=[TIMERS], args=[member, repr(due), repr(time.time())])
        else:
            self.redis.zadd(TIMERS, {member: due})

    def hasten(self, task: str, queue: str, arg: str, due: float) -> None:
        """Fire an existing timer at `due` if it is set for later; never (re)creates one."""
        self._hasten(keys=[TIMERS], args=[Timer(task, queue, arg, due).member, repr(due)])

    def cancel(self, task: str, queue: str, arg: str) -> None:
        self.redis.zrem(TIMERS, Timer(task, queue, arg, 0).member)

    def due(self, now: float, limit: int = 500) -> list[Timer]:
        raw = self._pop(keys=[TIMERS], args=[repr(now), limit])
        timers = []
        for member, score in zip(raw[::2], raw[1::2], strict=True):
            task, queue, arg = member.decode().split("|", 2)
            timers.append(Timer(task, queue, arg, float(score)))
        return timers

    def done(self, timer: Timer) -> None:
        """Remove a fired timer unless it was rescheduled meanwhile."""
        self._settle(keys=[TIMERS], args=[timer.member, repr(timer.due), ""])

    def lease(self, timer: Timer, until: float) -> None:
        """Keep a fired timer, due again at `until`, unless it was rescheduled meanwhile: its
        task removes it (`cancel`) once its step is done, so a task that failed is re-fired."""
        self._settle(keys=[TIMERS], args=[timer.member, repr(timer.due), repr(until)])

    def pending(self) -> int:
        return int(self.redis.zcard(TIMERS))


class Scheduler:
    """Fires due timers and periodic jobs while it holds the fleet-wide leader lease.

    Publish first, remove after: a crash in between re-fires the timer, and the delivery claim
    turns that duplicate into a no-op. Timers of the `leased` tasks (TIMER: drill steps) are not
    removed but pushed `timer_lease` ahead: a Celery task that fails is acked, not redelivered,
    and a drill step has no other owner to retry it, so its timer stays until the step removes
    it after completing (steps are idempotent: a re-fire sends nothing twice). Delivery and
    digest timers are removed on publish as before: their tasks' claims and the reaper recover
    a delivery whose task failed. Two schedulers never fire together (the lease).
    """

    def __init__(self, client: redis.Redis, publisher: Publisher, *, interval: float = 0.2,
                 lease: float = 5.0, periodic: list[tuple[float, Callable[[], None]]] | None = None,
                 leased: Collection[str] = (TIMER,), timer_lease: float = TIMER_LEASE) -> None:
        self.redis = client
        self.timers = Timers(client)
        self.publisher = publisher
        self.interval = interval
        self.lease_ms = int(lease * 1000)
        self.token = secrets.token_hex(8)
        self._renew = client.register_script(_RENEW)
        self.periodic = [(every, job, 0.0) for every, job in (periodic or [])]
        self.leased = frozenset(leased)
        self.timer_lease = timer_lease
        self.fired = 0

    def is_leader(self) -> bool:
        return bool(self._renew(keys=[LEADER], args=[self.token, self.lease_ms]))

    def tick(self) -> int:
        """One round: fire due timers and periodic jobs if leader. Returns timers fired."""
        if not self.is_leader():
            return 0
        fired = 0
        for timer in self.timers.due(time.time()):
            self.publisher.publish(timer.task, [timer.arg], timer.queue)
            if timer.task in self.leased:
                self.timers.lease(timer, time.time() + self.timer_lease)
            else:
                self.timers.done(timer)
            fired += 1
        now = time.monotonic()
        for i, (every, job, last) in enumerate(self.periodic):
            if now - last >= every:
                self.periodic[i] = (every, job, now)
                try:
                    job()
                except Exception:  # a failing job must not stop timers firing
                    log.exception("periodic job %s failed", getattr(job, "__name__", job))
        self.fired += fired
        return fired

    def run_forever(self, stop: Callable[[], bool] = lambda: False) -> None:
        while not stop():
            try:
                fired = self.tick()
            except (redis.RedisError, BrokerUnavailable) as exc:
                # Redis or the broker (the same Redis, or its failover) is away: a timer whose
                # publish failed is still in the set (neither removed nor leased), so waiting
                # loses nothing; exiting would take the whole `notifier up` stack down.
                log.warning("scheduler: redis or broker unavailable (%s); retrying",
                            type(exc).__name__)
                fired = 0
                time.sleep(1.0)
            if not fired:
                time.sleep(self.interval)

    def release(self) -> None:
        if self.redis.get(LEADER) == self.token.encode():
            self.redis.delete(LEADER)
