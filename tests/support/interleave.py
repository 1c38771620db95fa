"""Two workers' steps interleaved at the Redis level, deterministically: the test's redis
client is wrapped (not notifier's code) so that another worker's whole step runs once, right
before or right after the first command that matches."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import redis


@contextmanager
def interleaved(client: redis.Redis, matches: Callable[[list[str]], bool], other: Callable[[], str],
                *, after: bool = False) -> Iterator[list[str]]:
    """Within the block, the first command on `client` whose arguments (as text) `matches` runs
    `other` before it (or `after` its reply); the list yielded gets `other`'s result."""
    forward: Callable[..., Any] = client.execute_command
    ran: list[str] = []

    def execute_command(*args: Any, **options: Any) -> Any:
        due = not ran and matches([str(a) for a in args])
        if due and not after:
            ran.append(other())
        reply = forward(*args, **options)
        if due and after:
            ran.append(other())
        return reply

    client.execute_command = execute_command  # type: ignore[method-assign]
    try:
        yield ran
    finally:
        del client.execute_command
