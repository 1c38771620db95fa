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
        return self._loop.run_until_complete(coro)

    def close(self) -> None:
        if self._loop is not None and self._pid == os.getpid() and not self._loop.is_closed():
            self._loop.close()
        self._loop = None
