"""Run one Lua script for many concurrent requests, pipelined on the API's event loop.

The accept script is the only Redis call on the ingest path, so its cost is most of a
webhook's. Through redis-py it cost ~120 µs a call even when pipelined from a writer thread
(command packing in Python, plus the GIL hand-offs between that thread and the event loop).
Here the requests of one event-loop iteration share one script call (the script takes many
events, and queues one dispatch message for them: see notifier.ledger_accept), packed by
hiredis's C packer, written together with the loop's other calls, and parsed by hiredis as the
reply arrives. Under load concurrent requests share a call and a round trip (group commit); at
low load a request's call goes out at once. Nothing blocks the event loop while Redis is slow.

Where Redis is comes from the synchronous client's pool (notifier.redis_conn.connect), so the
URL forms, auth, db, TLS and Sentinel mean exactly what they mean everywhere else; a Sentinel
master is looked up again on every reconnect, and a READONLY reply (the master was demoted)
drops the link so that the next call finds the new one.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import ssl
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

import hiredis
import redis
from redis.connection import SSLConnection
from redis.exceptions import ResponseError
from redis.sentinel import SentinelConnectionPool

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass(frozen=True)
class Endpoint:
    """Where and how to open one connection to the (current) master."""
    host: str = ""
    port: int = 6379
    path: str = ""  # a unix socket instead of host:port
    tls: Any = None  # ssl.SSLContext
    handshake: tuple[tuple[str | int, ...], ...] = ()  # AUTH / SELECT, sent before any call
    connect_timeout: float = 5.0
    reply_timeout: float = 5.0


async def endpoint_of(client: redis.Redis) -> Endpoint:
    pool = client.connection_pool
    options = pool.connection_kwargs
    if isinstance(pool, SentinelConnectionPool):  # asks the sentinels: blocking I/O, off the loop
        host, port = await asyncio.to_thread(pool.get_master_address)
    else:
        host, port = options.get("host", ""), int(options.get("port", 6379))
    handshake: list[tuple[str | int, ...]] = []
    if options.get("password"):
        user = options.get("username")
        handshake.append(("AUTH", user, options["password"]) if user else ("AUTH", options["password"]))
    if options.get("db"):
        handshake.append(("SELECT", int(options["db"])))
    tls = tls_context(options) if issubclass(pool.connection_class, SSLConnection) else None
    return Endpoint(host=host, port=port, path=options.get("path", ""), tls=tls,
                    handshake=tuple(handshake),
                    connect_timeout=options.get("socket_connect_timeout") or 5.0,
                    reply_timeout=options.get("socket_timeout") or 5.0)


_VERIFY = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


def tls_context(options: dict[str, Any]) -> ssl.SSLContext:
    """The TLS context the synchronous client's `ssl_*` options describe (a rediss:// URL's
    query), as its SSLConnection builds it. Built here: redis-py's asyncio RedisSSLContext
    lacks ssl_ca_path and ssl_password before 7.2, which this project does not use (pyproject)."""
    reqs = options.get("ssl_cert_reqs", "required")
    context = ssl.create_default_context()
    context.check_hostname = bool(options.get("ssl_check_hostname", True)) and reqs != "none"
    context.verify_mode = _VERIFY[reqs] if isinstance(reqs, str) else ssl.VerifyMode(reqs)
    if options.get("ssl_certfile") or options.get("ssl_keyfile"):
        context.load_cert_chain(options["ssl_certfile"], options.get("ssl_keyfile"),
                                options.get("ssl_password"))
    if options.get("ssl_ca_certs") or options.get("ssl_ca_path") or options.get("ssl_ca_data"):
        context.load_verify_locations(options.get("ssl_ca_certs"), options.get("ssl_ca_path"),
                                      options.get("ssl_ca_data"))
    return context


class ScriptBatcher(Generic[Item, Result]):
    """`await run(item)`: the item's share of one script call that carries every item queued in
    the same event-loop iteration (at most `max_items` per call; more make more calls, pipelined).

    `combine(items)` builds that call's (keys, args); `split(items, reply)` gives one result
    per item, in order. A failed call (Redis unreachable, hung past the socket timeout, an error reply)
    raises its redis.RedisError in every request it carried.

    Latency is throughput here: a request waits for its reply, so a call is written the moment
    the iteration's batch is complete (or as soon as it is full), and a reply resolves its
    requests directly from the protocol callback (no task or extra loop iteration between).
    Group commit: while a call is in flight, what arrives waits for its reply and goes out
    with it as the next call, so that under load a call carries what arrived during one round
    trip instead of what one loop iteration read (a few requests, when two API processes share
    a machine): the round trip's costs on both sides are shared by more events. An idle API
    has nothing in flight, and sends at once, as before; a full call never waits."""

    def __init__(self, client: redis.Redis, source: str,
                 combine: Callable[[list[Item]], tuple[Sequence[str], Sequence[str | bytes | int]]],
                 split: Callable[[list[Item], Any], Sequence[Result]], max_items: int) -> None:
        self.client = client
        self.source = source
        # What SCRIPT LOAD would answer: EVALSHA needs no round trip to learn it.
        self.sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()
        self.combine = combine
        self.split = split
        self.max_items = max_items
        self._loops: dict[asyncio.AbstractEventLoop, _PerLoop[Item, Result]] = {}  # test clients

    def run(self, item: Item) -> asyncio.Future[Result]:
        """The item's result, to await (a plain future: no coroutine of its own per request)."""
        loop = asyncio.get_running_loop()
        here = self._loops.get(loop)
        if here is None:
            self._loops = {lp: st for lp, st in self._loops.items() if not lp.is_closed()}
            here = self._loops[loop] = _PerLoop(loop)
        future: asyncio.Future[Result] = loop.create_future()
        here.queued.append((item, future))
        if len(here.queued) >= self.max_items:  # a full call: let Redis start on it now
            self._flush(here)
        elif not here.flush_due and not here.in_flight:
            here.flush_due = True
            loop.call_soon(self._flush_due, here)
        return future

    def _flush_due(self, here: _PerLoop[Item, Result]) -> None:
        here.flush_due = False
        self._flush(here)

    def _flush(self, here: _PerLoop[Item, Result]) -> None:
        queued, here.queued = here.queued, []
        if not queued:  # sent early, when it filled up
            return
        if here.closing:
            _fail(queued, redis.ConnectionError("the API is shutting down"))
            return
        link = here.link
        if link is None or link.closed:
            link = here.link = _Link(here.loop, self.client)
        if link.ready.done():
            self._send(here, link, queued)
        else:  # still connecting: these go out once it is open (or fail with it)
            link.ready.add_done_callback(lambda _: self._send(here, link, queued))

    def _send(self, here: _PerLoop[Item, Result], link: _Link,
              queued: list[tuple[Item, asyncio.Future[Result]]]) -> None:
        if link.closed:  # could not connect, or the connection broke since
            opened = link.ready
            error = (opened.exception() if opened.done() and not opened.cancelled() else None)
            _fail(queued, error if isinstance(error, redis.RedisError)
                  else redis.ConnectionError("connection to Redis lost; retry"))
            return
        for start in range(0, len(queued), self.max_items):
            batch = queued[start:start + self.max_items]
            try:
                keys, args = self.combine([item for item, _ in batch])
                head = (len(keys), *keys, *args)
                command = _pack(("EVALSHA", self.sha, *head))
            except Exception as exc:
                _fail(batch, exc)
                continue
            here.in_flight += 1  # settled exactly once: by its reply, or by the link failing
            link.send(command, functools.partial(self._settle, here, batch),
                      fallback=functools.partial(_pack, ("EVAL", self.source, *head)))
        link.write_out()

    def _settle(self, here: _PerLoop[Item, Result], batch: list[tuple[Item, asyncio.Future[Result]]],
                reply: Any) -> None:
        here.in_flight -= 1
        try:
            self._resolve(batch, reply)
        finally:  # what waited for this reply goes out now (on a new link, if this one failed)
            if here.queued and not here.in_flight and not here.flush_due:
                self._flush(here)

    def _resolve(self, batch: list[tuple[Item, asyncio.Future[Result]]], reply: Any) -> None:
        if isinstance(reply, Exception):
            _fail(batch, reply)
            return
        try:  # runs in the protocol's callback: whatever happens, every request hears of it
            results = list(self.split([item for item, _ in batch], reply))
            if len(results) != len(batch):
                raise redis.ResponseError(f"script answered {len(results)} of {len(batch)} calls")
        except redis.RedisError as exc:
            _fail(batch, exc)
            return
        except Exception as exc:  # not the script's answer: whatever sits on that port is no Redis
            _fail(batch, redis.ResponseError(f"unexpected reply to the script ({type(exc).__name__})"))
            return
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():  # that request went away (client disconnected)
                future.set_result(result)

    async def aclose(self) -> None:
        """Close this loop's connection (the app's shutdown)."""
        here = self._loops.pop(asyncio.get_running_loop(), None)
        if here is None:
            return
        here.closing = True
        if here.link is not None:
            here.link.close()


def _fail(batch: Sequence[tuple[Any, asyncio.Future[Any]]], error: BaseException) -> None:
    for _, future in batch:
        if not future.done():
            future.set_exception(error)


class _PerLoop(Generic[Item, Result]):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.link: _Link | None = None
        self.queued: list[tuple[Item, asyncio.Future[Result]]] = []
        self.flush_due = False  # a flush is scheduled for this iteration's end (_flush_due)
        self.in_flight = 0  # calls written and not yet answered (or failed)
        self.closing = False  # aclose() ran: no new link, what is queued fails


def _pack(command: tuple[str | bytes | int, ...]) -> bytes:
    """RESP bytes of one command, packed in C (hiredis's stub types a 1-tuple by mistake)."""
    packed: bytes = hiredis.pack_command(command)  # type: ignore[arg-type]
    return packed


@dataclass
class _Pending:
    settle: Callable[[Any], None]  # called once, with the reply or an exception
    deadline: float
    fallback: Callable[[], bytes] | None  # the same call as EVAL, sent if Redis lost the script


class _Link(asyncio.Protocol):
    """One connection and its in-flight calls, replies matched to calls in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop, client: redis.Redis) -> None:
        self.loop = loop
        self.closed = False
        self.transport: asyncio.Transport | None = None
        self.reader = hiredis.Reader(replyError=ResponseError)
        self.pending: deque[_Pending] = deque()
        self.outgoing: list[bytes] = []
        self.watchdog: asyncio.TimerHandle | None = None
        self.endpoint = Endpoint()
        self.ready = loop.create_task(self._open(client))
        self.ready.add_done_callback(lambda task: task.cancelled() or task.exception())

    def send(self, command: bytes, settle: Callable[[Any], None],
             fallback: Callable[[], bytes] | None = None) -> None:
        """Queue a command (written by `write_out`); `settle` gets its reply or error."""
        pending = _Pending(settle, self.loop.time() + self.endpoint.reply_timeout, fallback)
        self.pending.append(pending)
        self.outgoing.append(command)
        if self.watchdog is None:
            self.watchdog = self.loop.call_at(pending.deadline, self._check_deadline)

    def write_out(self) -> None:
        if self.transport is not None and not self.closed and self.outgoing:
            self.transport.write(b"".join(self.outgoing))
        self.outgoing.clear()

    def close(self) -> None:
        if not self.ready.done():
            self.ready.cancel()
        self._fail(redis.ConnectionError("the API is shutting down"))

    async def _open(self, client: redis.Redis) -> None:
        try:
            self.endpoint = endpoint = await endpoint_of(client)
            if endpoint.path:
                opening = self.loop.create_unix_connection(lambda: self, endpoint.path)
            else:
                opening = self.loop.create_connection(
                    lambda: self, endpoint.host, endpoint.port, ssl=endpoint.tls,
                    server_hostname=endpoint.host if endpoint.tls else None)
            await asyncio.wait_for(opening, endpoint.connect_timeout)
        except (OSError, TimeoutError) as exc:
            self.closed = True
            raise redis.ConnectionError(f"cannot connect to Redis: {type(exc).__name__}") from None
        except redis.RedisError:
            self.closed = True
            raise
        for command in endpoint.handshake:
            answered: asyncio.Future[Any] = self.loop.create_future()
            self.send(_pack(command), functools.partial(_resolve, answered))
            self.write_out()
            try:
                await answered
            except ResponseError as exc:  # wrong password, no such db: name the step, not the secret
                refused = redis.ConnectionError(f"Redis refused {command[0]}: {str(exc).split(' ', 1)[0]}")
                self._fail(refused)
                raise refused from None

    def _check_deadline(self) -> None:
        self.watchdog = None
        if not self.pending:
            return
        oldest = self.pending[0].deadline
        if self.loop.time() >= oldest:  # hung Redis: the replies still owed would come out of order
            self._fail(redis.TimeoutError("Redis did not answer within the socket timeout"))
        else:
            self.watchdog = self.loop.call_at(oldest, self._check_deadline)

    def _fail(self, error: redis.RedisError) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()
        if self.watchdog is not None:
            self.watchdog.cancel()
            self.watchdog = None
        self.outgoing.clear()
        while self.pending:
            self.pending.popleft().settle(error)

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        try:
            self.reader.feed(data)
            while (reply := self.reader.gets()) is not False:
                self._reply(reply)
        except hiredis.ProtocolError:
            self._fail(redis.ConnectionError("Redis sent a reply that is not RESP"))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self._fail(redis.ConnectionError("Redis closed the connection"))

    def _reply(self, reply: Any) -> None:
        if not self.pending:  # a reply nobody asked for: the stream is out of step
            self._fail(redis.ConnectionError("Redis sent an unexpected reply"))
            return
        pending = self.pending.popleft()
        if isinstance(reply, ResponseError):
            message = str(reply)
            if message.startswith("NOSCRIPT") and pending.fallback is not None:
                # Redis restarted or flushed its scripts: EVAL runs it and caches it again
                self.send(pending.fallback(), pending.settle)
                self.write_out()
                return
            if message.startswith("READONLY"):  # a demoted master: find the new one next call
                readonly = redis.ReadOnlyError(message)
                self.pending.appendleft(pending)  # closed before anyone settles: waiters use a new link
                self._fail(readonly)
                return
        pending.settle(reply)


def _resolve(future: asyncio.Future[Any], reply: Any) -> None:
    if future.done():
        return
    if isinstance(reply, BaseException):
        future.set_exception(reply)
    else:
        future.set_result(reply)
