"""Run provider coroutines from synchronous Celery tasks on one loop per process.

The loop is created lazily, after Celery has forked the worker children: a loop (or an SMTP
client bound to one) created before the fork would be shared by every child.

The loop runs one provider coroutine at a time and nothing else, so a provider may block it
(the Aliyun SDK's pooled sync client does: notifier.channels.sms_aliyun). Never hand provider
coroutines to a loop that serves other work, such as the API's.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any, Protocol, TypeVar

T = TypeVar("T")

# How long an abandoned provider call may take to unwind once cancelled (its finally blocks:
# SMTP closes its socket within 1 s). Well inside the 10 s between Celery's soft and hard
# time limits (celeryconfig).
SETTLE_SECONDS = 3.0


class AsyncRunner(Protocol):
    def run(self, coro: Coroutine[Any, Any, T]) -> T: ...


class ProcessLoop:
    """One event loop per process, recreated if the process was forked since."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pid = 0

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._loop is None or self._pid != os.getpid() or self._loop.is_closed():
            self._loop = asyncio.new_event_loop()
            self._pid = os.getpid()
        loop = self._loop
        task = loop.create_task(coro)
        try:
            return loop.run_until_complete(task)
        except BaseException:
            # Celery's soft time limit (SoftTimeLimitExceeded, raised from a signal handler)
            # or a KeyboardInterrupt can unwind run_until_complete while the provider call is
            # still pending on this loop; the next task's run() would resume it and finish a
            # send the pipeline has already recorded as failed and will retry: a duplicate.
            # So it is cancelled here, and given time to unwind, before the error goes up.
            self._abandon(loop)
            raise

    def _abandon(self, loop: asyncio.AbstractEventLoop) -> None:
        # The loop runs provider calls only (module docstring), so every task still pending
        # belongs to the call being given up, including any it spawned.
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        if not pending:
            return
        for task in pending:
            task.cancel()
        try:
            loop.run_until_complete(asyncio.wait(pending, timeout=SETTLE_SECONDS))
        finally:  # a second interrupt during the wait still goes up, after this
            for task in pending:
                if task.done() and not task.cancelled():
                    task.exception()  # retrieved: no "Task exception was never retrieved" log
            if not all(t.done() for t in pending):
                # A call that ignores cancellation, or a wait cut short: drop the loop so
                # nothing ever resumes the call; the next run() starts a fresh one.
                loop.close()
                self._loop = None

    def close(self) -> None:
        if self._loop is not None and self._pid == os.getpid() and not self._loop.is_closed():
            self._loop.close()
        self._loop = None
