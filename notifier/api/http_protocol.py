"""uvicorn's httptools protocol, with a response's writes sent together.

uvicorn writes a response's status line and headers the moment the app sends
`http.response.start`, then its body on `http.response.body`: two send() calls per response,
each a system call and, on a TCP connection, a segment of its own that the client reads
separately. The API's answers are a few hundred bytes, so those calls were most of what
answering costs (bench/RESULTS.md: uvicorn's `send` was the largest item of the API's profile).
Here a connection's writes wait in memory until the event loop's current iteration ends, and
go out as one send(): the same bytes, in the same order, one call. Nothing waits longer than
that iteration (so code that runs on after sending its answer without awaiting anything holds
the answer back while it runs: the API has none); closing a connection sends what is held
first, and a response streaming more than HOLD_AT_MOST in one iteration is handed on at once,
so that the real transport's flow control (pause_writing once its buffer is full) still paces
it.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

HOLD_AT_MOST = 64 * 1024


class CoalescingTransport:
    """A transport whose write() holds data until the loop's next turn. Everything else is the
    real transport's (flow control, extra info, pausing reads)."""

    __slots__ = ("_held", "_held_bytes", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: list[bytes] = []
        self._held_bytes = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        chunk = bytes(data)
        if not self._held:
            self._loop.call_soon(self.flush)
        self._held.append(chunk)
        self._held_bytes += len(chunk)
        if self._held_bytes > HOLD_AT_MOST:
            self.flush()

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    def flush(self) -> None:
        if not self._held:
            return
        held, self._held, self._held_bytes = self._held, [], 0
        if not self._transport.is_closing():  # as the real transport's write: dropped once closed
            self._transport.write(held[0] if len(held) == 1 else b"".join(held))

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + self._held_bytes

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._held, self._held_bytes = [], 0
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    transport: CoalescingTransport  # type: ignore[assignment]

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]

    def eof_received(self) -> None:
        # The client half-closed (or a TLS close_notify): the real transport closes itself next,
        # past the wrapper, so an answer still held would be dropped. uvloop reads before it
        # runs the loop's callbacks, so that can come between an answer and its flush.
        self.transport.flush()
        super().eof_received()
