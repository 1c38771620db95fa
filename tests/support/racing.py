"""Several OS processes racing for one fleet-wide resource, released together by a barrier."""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable
from multiprocessing.synchronize import Barrier
from typing import Any


def race(target: Callable[..., None], racers: int, *args: Any) -> list[Any]:
    """Run `target(*args, barrier, out)` in `racers` spawned processes; return what each put on
    `out`. Spawned, not forked, so each racer has its own Redis connections, like a worker."""
    ctx = mp.get_context("spawn")
    barrier: Barrier = ctx.Barrier(racers)
    out: mp.Queue[Any] = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, barrier, out)) for _ in range(racers)]
    for proc in procs:
        proc.start()
    results = [out.get(timeout=60) for _ in procs]
    for proc in procs:
        proc.join(timeout=30)
        assert proc.exitcode == 0
    return results
