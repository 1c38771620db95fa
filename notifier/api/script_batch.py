"""Run one Lua script for many concurrent requests, pipelined on the API's event loop.

The accept script is the only Redis call on the ingest path, so its client-side cost is most of
a webhook's CPU. Through redis-py it cost ~120 µs a call even when pipelined from a writer
thread (command packing in Python, plus the GIL hand-offs between that thread and the event
loop); here a call is packed by hiredis's C packer and written with every other call made in
the same loop iteration, and replies are parsed by hiredis as they arrive (~15 µs a call).
Under load concurrent requests share one write and one round trip (group commit); at low load
a call goes out at once. Nothing blocks the event loop while Redis is slow.

Where Redis is comes from the synchronous client's pool (notifier.redis_conn.connect), so the
URL forms, auth, db, TLS and Sentinel mean exactly what they mean everywhere else; a Sentinel
master is looked up again on every reconnect, and a READONLY reply (the master was demoted)
drops the link so that the next call finds the new one.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import hiredis
import redis
from redis.asyncio.connection import RedisSSLContext
from redis.connection import SSLConnection
from redis.exceptions import ResponseError
from redis.sentinel import SentinelConnectionPool


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
    tls = None
    if issubclass(pool.connection_class, SSLConnection):
        tls = RedisSSLContext(keyfile=options.get("ssl_keyfile"), certfile=options.get("ssl_certfile"),
                              cert_reqs=options.get("ssl_cert_reqs", "required"),
                              ca_certs=options.get("ssl_ca_certs"), ca_data=options.get("ssl_ca_data"),
                              ca_path=options.get("ssl_ca_path"),
                              check_hostname=options.get("ssl_check_hostname", True),
                              password=options.get("ssl_password")).get()
    return Endpoint(host=host, port=port, path=options.get("path", ""), tls=tls,
                    handshake=tuple(handshake),
                    connect_timeout=options.get("socket_connect_timeout") or 5.0,
                    reply_timeout=options.get("socket_timeout") or 5.0)


class ScriptBatcher:
    """`run(keys, args)` = EVALSHA of one script, batched with every other concurrent call."""

    def __init__(self, client: redis.Redis, source: str) -> None:
        self.client = client
        self.source = source
        # What SCRIPT LOAD would answer: EVALSHA needs no round trip to learn it.
        self.sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()
        self._links: dict[asyncio.AbstractEventLoop, _Link] = {}  # one per loop (test clients)

    async def run(self, keys: Sequence[str], args: Sequence[str | int]) -> Any:
        """The script's reply; raises a redis.RedisError when Redis is unreachable, hung past
        the socket timeout, or answers with an error."""
        loop = asyncio.get_running_loop()
        link = self._links.get(loop)
        if link is None or link.closed:
            self._links = {lp: ln for lp, ln in self._links.items() if not lp.is_closed()}
            link = self._links[loop] = _Link(loop, self.client)
        head = (len(keys), *keys, *args)
        return await link.call(_pack(("EVALSHA", self.sha, *head)),
                               lambda: _pack(("EVAL", self.source, *head)))


    async def aclose(self) -> None:
        """Close this loop's connection (the app's shutdown)."""
        link = self._links.pop(asyncio.get_running_loop(), None)
        if link is not None:
            await link.aclose()


def _pack(command: tuple[str | int, ...]) -> bytes:
    """RESP bytes of one command, packed in C (hiredis's stub types a 1-tuple by mistake)."""
    packed: bytes = hiredis.pack_command(command)  # type: ignore[arg-type]
    return packed


@dataclass
class _Pending:
    future: asyncio.Future[Any]
    deadline: float
    fallback: Any  # () -> bytes: the same call as EVAL, sent once if Redis lost the script


class _Link(asyncio.Protocol):
    """One connection and its in-flight calls, replies matched to calls in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop, client: redis.Redis) -> None:
        self.loop = loop
        self.closed = False
        self.transport: asyncio.Transport | None = None
        self.reader = hiredis.Reader(replyError=ResponseError)
        self.pending: deque[_Pending] = deque()
        self.outgoing: list[bytes] = []
        self.flush_scheduled = False
        self.watchdog: asyncio.TimerHandle | None = None
        self.endpoint = Endpoint()
        self.ready = loop.create_task(self._open(client))
        self.ready.add_done_callback(lambda task: task.cancelled() or task.exception())

    async def call(self, command: bytes, fallback: Any = None) -> Any:
        if not self.ready.done():
            await asyncio.shield(self.ready)
        self.ready.result()  # the link could not be opened: that error, to every waiter
        if self.closed:
            raise redis.ConnectionError("connection to Redis lost; retry")
        future = self.loop.create_future()
        self._send(command, _Pending(future, self.loop.time() + self.endpoint.reply_timeout, fallback))
        return await future

    async def aclose(self) -> None:
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
            future = self.loop.create_future()
            self._send(_pack(command),
                       _Pending(future, self.loop.time() + endpoint.reply_timeout, None))
            try:
                await future
            except ResponseError as exc:  # wrong password, no such db: name the step, not the secret
                refused = redis.ConnectionError(f"Redis refused {command[0]}: {str(exc).split(' ', 1)[0]}")
                self._fail(refused)
                raise refused from None

    def _send(self, command: bytes, pending: _Pending) -> None:
        self.pending.append(pending)
        self.outgoing.append(command)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self._flush)
        if self.watchdog is None:
            self.watchdog = self.loop.call_at(pending.deadline, self._check_deadline)

    def _flush(self) -> None:
        self.flush_scheduled = False
        if self.transport is not None and not self.closed and self.outgoing:
            self.transport.write(b"".join(self.outgoing))
        self.outgoing.clear()

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
        while self.pending:
            future = self.pending.popleft().future
            if not future.done():
                future.set_exception(error)

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        try:
            self.reader.feed(data)
            while (reply := self.reader.gets()) is not False:
                self._settle(reply)
        except hiredis.ProtocolError:
            self._fail(redis.ConnectionError("Redis sent a reply that is not RESP"))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self._fail(redis.ConnectionError("Redis closed the connection"))

    def _settle(self, reply: Any) -> None:
        if not self.pending:  # a reply nobody asked for: the stream is out of step
            self._fail(redis.ConnectionError("Redis sent an unexpected reply"))
            return
        pending = self.pending.popleft()
        if isinstance(reply, ResponseError):
            message = str(reply)
            if message.startswith("NOSCRIPT") and pending.fallback is not None:
                # Redis restarted or flushed its scripts: EVAL runs it and caches it again
                self._send(pending.fallback(), _Pending(pending.future, pending.deadline, None))
                return
            if message.startswith("READONLY"):  # a demoted master: find the new one next call
                self._fail(redis.ReadOnlyError(message))
                return
        if pending.future.done():  # that request went away (client disconnected)
            return
        if isinstance(reply, ResponseError):
            pending.future.set_exception(reply)
        else:
            pending.future.set_result(reply)
