"""Waiting out a Redis blip inside a worker step, where giving the step up costs more than
waiting: a failover, a restart, a full memory freed by the operator.

A dispatch whose send tasks were only partly published would leave its deliveries for the
reaper, a minute late; a send the provider took but whose record could not be written would be
taken over as maybe sent and, on email or push (no look-up), sent to the person again. So such
steps run again (they are idempotent) until Redis answers, for a bounded time; past it the
error goes up as before, and the reaper or the outbox sweep has what is left.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import redis

from notifier.errors import BrokerUnavailable

T = TypeVar("T")
log = logging.getLogger(__name__)

# Unreachable, or refusing writes for now: out of memory at maxmemory, a replica not yet
# promoted (READONLY), a queued write refused inside MULTI (EXECABORT, e.g. for OOM).
REDIS_BLIPS: tuple[type[Exception], ...] = (
    redis.ConnectionError, redis.TimeoutError, redis.exceptions.OutOfMemoryError,
    redis.exceptions.ReadOnlyError, redis.exceptions.ExecAbortError, BrokerUnavailable)
FIRST_PAUSE, LONGEST_PAUSE = 0.25, 2.0  # doubling in between


def until_redis_answers(step: Callable[[], T], *, wait: float, what: str) -> T:
    """`step()`, run again while Redis is unavailable, for up to `wait` seconds from now."""
    started, pause = time.monotonic(), FIRST_PAUSE
    while True:
        try:
            return step()
        except REDIS_BLIPS as exc:
            if time.monotonic() + pause - started > wait:
                raise
            log.warning("%s: Redis unavailable (%s); trying again in %.2fs", what,
                        type(exc).__name__, pause)
            time.sleep(pause)
            pause = min(pause * 2, LONGEST_PAUSE)
