"""Reject oversized bodies with 413 before they are read into memory."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from notifier.api.raw import Answer, send_json


def declared_too_large(headers: dict[bytes, bytes], max_bytes: int) -> bool | None:
    """Whether the Content-Length is over the limit; None when there is none (chunked): then the
    body must be counted as it is read. (With one, the server's HTTP parser holds the body to
    it: no counting needed.)"""
    declared = headers.get(b"content-length")
    if declared is not None and declared.isdigit():
        return int(declared) > max_bytes
    return None


def too_large_answer(max_bytes: int) -> Answer:
    return 413, {"detail": f"request body larger than {max_bytes} bytes"}, []


async def reject_too_large(send: Send, max_bytes: int) -> None:
    await send_json(send, *too_large_answer(max_bytes))


class BodySizeLimit:
    """For the FastAPI app; the ingest routes (notifier.api.ingest) apply the same limit as they
    read the body."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = declared_too_large(dict(scope.get("headers", [])), self.max_bytes)
        if too_large is not None:
            if too_large:
                await reject_too_large(send, self.max_bytes)
            else:
                await self.app(scope, receive, send)
            return
        # No Content-Length (chunked): read it here, counting, and hand the app the whole body.
        # (Raising from inside the app's receive would not do: FastAPI turns an error while
        # reading the body into its own 400/422, which would not say what is wrong.)
        try:
            body = await read_body(receive, self.max_bytes)
        except ClientGone:
            return
        if body is None:
            await reject_too_large(send, self.max_bytes)
            return
        handed = False

        async def replay() -> Message:
            nonlocal handed
            if handed:
                return await receive()  # what comes after the body: the disconnect
            handed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


class ClientGone(Exception):
    """The client disconnected before its whole body arrived: there is nothing to answer, and
    a part of a body must never be taken for the request (a first chunk can be valid JSON)."""


async def read_body(receive: Receive, max_bytes: int | None) -> bytes | None:
    """The whole request body; None once it grows past `max_bytes` (None: no limit to count).
    ClientGone if the client left before its end."""
    chunks: list[bytes] = []
    seen = 0
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        seen += len(chunk)
        if max_bytes is not None and seen > max_bytes:
            return None
        chunks.append(chunk)
        more = message.get("more_body", False)
    return b"".join(chunks)
