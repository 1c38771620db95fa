"""A small HTTP/1.1 keep-alive load generator on asyncio (uvloop when installed).

Written against raw streams rather than an HTTP client library so that the generator costs
little CPU: on a 2-core machine it shares the cores with the server it measures, and the same
generator drives both notifier and the bare-endpoint baseline, so the ratio stays fair.

Two shapes, both bounded in request count and in time:
- `open_loop`: requests start on a fixed schedule (rate/s) whether or not earlier ones have
  answered; latency is measured from the scheduled start (no coordinated omission).
- `closed_loop`: `connections` clients each send the next request as soon as the last answered
  (saturation); latency from send to full response.
Only loopback targets are accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

LOOPBACK = ("127.0.0.1", "::1", "localhost")


@dataclass
class Sample:
    scheduled: float  # wall clock (time.time()) the request was due
    sent: float  # wall clock it was written
    latency: float  # seconds, from `scheduled` (open loop) or `sent` (closed loop)
    status: int
    body: bytes


@dataclass
class LoadResult:
    samples: list[Sample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    started: float = 0.0  # monotonic
    finished: float = 0.0
    not_sent: int = 0  # requests dropped because the time bound ran out

    @property
    def elapsed(self) -> float:
        return max(self.finished - self.started, 1e-9)

    @property
    def ok(self) -> list[Sample]:
        return [s for s in self.samples if 200 <= s.status < 300]

    @property
    def throughput(self) -> float:
        return len(self.ok) / self.elapsed


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


def build_request(host: str, port: int, path: str, body: bytes,
                  headers: dict[str, str] | None = None) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}",
             "Content-Type: application/json", f"Content-Length: {len(body)}",
             "Connection: keep-alive"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class Connection:
    def __init__(self, host: str, port: int) -> None:
        if host not in LOOPBACK:
            raise ValueError(f"the load generator only targets loopback, not {host!r}")
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()
        self.reader = self.writer = None

    async def request(self, raw: bytes, timeout: float) -> tuple[int, bytes]:
        if self.writer is None:
            await self.open()
        assert self.reader is not None and self.writer is not None
        self.writer.write(raw)
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), timeout)
        status_line, _, rest = head.partition(b"\r\n")
        status = int(status_line.split()[1])
        length, chunked, close = 0, False, False
        for line in rest.split(b"\r\n"):
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
        if chunked:
            body = b""
            while True:
                size = int((await asyncio.wait_for(self.reader.readuntil(b"\r\n"), timeout)).strip(), 16)
                chunk = await asyncio.wait_for(self.reader.readexactly(size + 2), timeout)
                if size == 0:
                    break
                body += chunk[:-2]
        else:
            body = await asyncio.wait_for(self.reader.readexactly(length), timeout) if length else b""
        if close:
            await self.close()
        return status, body


async def _one(conn: Connection, raw: bytes, scheduled: float, timeout: float,
               result: LoadResult, from_scheduled: bool) -> None:
    sent = time.time()
    t0 = time.perf_counter()
    try:
        status, body = await conn.request(raw, timeout)
    except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as exc:
        result.errors.append(f"{type(exc).__name__}: {exc}")
        await conn.close()
        return
    took = time.perf_counter() - t0
    latency = took + (sent - scheduled if from_scheduled else 0.0)
    result.samples.append(Sample(scheduled, sent, max(latency, took), status, body))


async def open_loop(host: str, port: int, requests: Sequence[bytes], rate: float, *,
                    max_seconds: float, pool: int = 64, timeout: float = 10.0) -> LoadResult:
    """Start request i at t0 + i/rate, on a free keep-alive connection (opening more as needed,
    up to `pool`). Requests not started within `max_seconds` are counted in `not_sent`."""
    result = LoadResult()
    idle: asyncio.Queue[Connection] = asyncio.Queue()
    opened = 0
    for _ in range(min(8, pool)):
        conn = Connection(host, port)
        await conn.open()
        idle.put_nowait(conn)
        opened += 1
    tasks: list[asyncio.Task[None]] = []

    async def run(raw: bytes, scheduled: float) -> None:
        nonlocal opened
        if idle.empty() and opened < pool:
            opened += 1
            conn = Connection(host, port)
        else:
            conn = await idle.get()
        try:
            await _one(conn, raw, scheduled, timeout, result, from_scheduled=True)
        finally:
            idle.put_nowait(conn)

    result.started = time.monotonic()
    wall0 = time.time() + 0.05
    mono0 = result.started + 0.05
    for i, raw in enumerate(requests):
        due = mono0 + i / rate
        if due - result.started > max_seconds:
            result.not_sent = len(requests) - i
            break
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(run(raw, wall0 + i / rate)))
    if tasks:
        await asyncio.wait(tasks, timeout=timeout + 5)
    result.finished = time.monotonic()
    while not idle.empty():
        await idle.get_nowait().close()
    return result


async def closed_loop(host: str, port: int, requests: Sequence[bytes], *, connections: int,
                      max_seconds: float, timeout: float = 10.0) -> LoadResult:
    """`connections` clients pull the next request off a shared list until it or the time runs out."""
    result = LoadResult()
    next_index = 0
    conns = [Connection(host, port) for _ in range(connections)]
    for conn in conns:
        await conn.open()
    result.started = time.monotonic()
    stop_at = result.started + max_seconds

    async def client(conn: Connection) -> None:
        nonlocal next_index
        while next_index < len(requests) and time.monotonic() < stop_at:
            raw = requests[next_index]
            next_index += 1
            await _one(conn, raw, time.time(), timeout, result, from_scheduled=False)

    await asyncio.gather(*(client(c) for c in conns))
    result.finished = time.monotonic()
    result.not_sent = len(requests) - next_index
    for conn in conns:
        await conn.close()
    return result


def run(coro_factory: Callable[[], object]) -> LoadResult:
    """Run one load shape on a fresh loop (uvloop if available)."""
    try:
        import uvloop  # noqa: PLC0415 - optional speed-up of the generator only
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    else:
        runner = uvloop.run
    return runner(coro_factory())  # type: ignore[arg-type]
