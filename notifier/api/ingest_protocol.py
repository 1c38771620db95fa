"""The ingest routes answered by the HTTP protocol itself, without an ASGI cycle.

Through ASGI, uvicorn gives every request a RequestResponseCycle, an asyncio.Event, a task
running the app, and two `send` coroutines that re-check each header; for a webhook that
costs more than validating and storing it. So for the common shape of an ingest request
(POST to /v1/alertmanager or /v1/events exactly, HTTP/1.1 keep-alive, a Content-Length
within max_body_bytes, no Expect, nothing still being answered on the connection) the
protocol runs IngestRoutes' three steps (refuse, submit, finish: notifier.api.ingest) from its
parser callbacks, and writes the answer when the accept call's future is done. Any other
request (chunked, HTTP/1.0, Connection: close, a query string, pipelined behind another,
a declared size past the limit) goes through ASGI as before, so both paths give the same
answers (tests/integration/test_ingest_protocol.py walks a table of requests through both).

What uvicorn's cycle offers the protocol is kept: answers in request order (a request
pipelined behind one answered here waits in uvicorn's pipeline, started by
on_response_complete; an answer is never written from inside the parser, so what follows in
the same read is queued first), the keep-alive timeout, Connection: close at shutdown, a
disconnect (nothing is written; the event was accepted or not as the call decides, as with
ASGI), and an exception answers 500 and closes the connection, as uvicorn does (in JSON, as
every answer of the API).
"""

from __future__ import annotations

import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE

from notifier.api.http_protocol import CoalescingHttpToolsProtocol
from notifier.api.ingest import SPECS, IngestRoutes
from notifier.api.raw import Answer, json_response

log = logging.getLogger(__name__)
_PATHS = {path.encode(): path for path in SPECS}
_ERROR: Answer = (500, {"detail": "Internal Server Error"}, [])


class _NoEvent:
    """uvicorn's connection_lost wakes the cycle's body reader: here, nobody waits."""

    def set(self) -> None:
        pass


_NO_EVENT = _NoEvent()


class _Request:
    """A request answered here: the part of uvicorn's RequestResponseCycle its protocol
    callbacks use (body, more_body, response_complete, disconnected, keep_alive,
    message_event)."""

    __slots__ = ("body", "disconnected", "headers", "keep_alive", "more_body", "path",
                 "response_complete")
    message_event = _NO_EVENT

    def __init__(self, path: str, headers: dict[bytes, bytes]) -> None:
        self.path = path
        self.headers = headers
        self.body = bytearray()
        self.more_body = True
        self.response_complete = False
        self.disconnected = False
        self.keep_alive = True  # shutdown() turns it off: answer with Connection: close


class IngestHttpProtocol(CoalescingHttpToolsProtocol):
    def on_headers_complete(self) -> None:
        request = self._answerable()
        if request is None:
            super().on_headers_complete()
        else:
            self.cycle = request  # type: ignore[assignment]

    def _answerable(self) -> _Request | None:
        ingest = self.app
        path = _PATHS.get(self.url)
        parser = self.parser
        if (path is None or not isinstance(ingest, IngestRoutes) or self.expect_100_continue
                or (self.cycle is not None and not self.cycle.response_complete)
                or parser.get_method() != b"POST" or parser.get_http_version() != "1.1"
                or not parser.should_keep_alive() or parser.should_upgrade()
                or self.limit_concurrency is not None or self.root_path):
            return None
        headers = dict(self.headers)
        length = headers.get(b"content-length")
        if (length is None or not length.isdigit() or int(length) > ingest.max_bytes
                or b"transfer-encoding" in headers):  # the parser's framing wins: let ASGI count
            return None
        return _Request(path, headers)

    def _request(self) -> _Request | None:
        """The request being read, if it is one answered here."""
        cycle: object = self.cycle
        return cycle if type(cycle) is _Request else None

    def on_body(self, body: bytes) -> None:
        request = self._request()
        if request is not None:  # bounded by its Content-Length: no pause at a high-water mark
            request.body += body
        else:
            super().on_body(body)

    def on_message_complete(self) -> None:
        request = self._request()
        if request is None:
            super().on_message_complete()
            return
        request.more_body = False
        ingest: IngestRoutes = self.app
        try:
            answer = ingest.refuse(request.headers, False)
            pending = ingest.submit(request.path, bytes(request.body), request.headers) \
                if answer is None else answer
        except Exception:
            pending = self._failed(request)
        if isinstance(pending, tuple):
            # Not from inside the parser: the data it is reading may hold more requests, which
            # must queue behind this one (uvicorn's pipeline) before it completes, as they do
            # behind an ASGI task. Answered here, it would arm the keep-alive timeout under
            # the next request, or, closing, leave the next one read and accepted unanswered.
            self.loop.call_soon(self._answer, request, pending)
        else:
            pending.add_done_callback(lambda done: self._finish(request, ingest, done))

    def _finish(self, request: _Request, ingest: IngestRoutes, done: Any) -> None:
        try:
            answer = ingest.finish(request.path, done)
        except Exception:
            answer = self._failed(request)
        self._answer(request, answer)

    @staticmethod
    def _failed(request: _Request) -> Answer:
        """A bug's answer: logged, 500, and the connection closed after it, as uvicorn does."""
        log.exception("ingest request failed")
        request.keep_alive = False
        return _ERROR

    def _answer(self, request: _Request, answer: Answer) -> None:
        request.response_complete = True
        if request.disconnected:
            return
        status, payload, extra = answer
        if not request.keep_alive:  # shut down, or a bug's answer
            extra = [*extra, (b"connection", b"close")]
        headers, body = json_response(payload, extra)
        content = [STATUS_LINE[status]]
        for name, value in (*self.server_state.default_headers, *headers):
            content += [name, b": ", value, b"\r\n"]
        content += [b"\r\n", body]
        self.transport.write(b"".join(content))
        if not request.keep_alive:
            self.transport.close()
        self.on_response_complete()
