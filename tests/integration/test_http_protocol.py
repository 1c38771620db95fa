"""The API's HTTP protocol (notifier.api.http_protocol): a response's writes go out together,
and nothing about what the client receives changes: pipelined requests, Connection: close,
large streamed bodies.

The coalescing itself is checked on a real asyncio transport (a socket pair), by what reaches
the peer and when; the rest against a real uvicorn server with the protocol, over loopback.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from notifier.api.http_protocol import HOLD_AT_MOST, CoalescingHttpToolsProtocol, CoalescingTransport
from tests.support.served import Served

STREAMED = 1024 * 1024 + 17  # past HOLD_AT_MOST many times over, and not a round size


class _Sink(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]


async def _pair() -> tuple[CoalescingTransport, socket.socket, asyncio.Transport]:
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_connection(_Sink, sock=ours)
    return CoalescingTransport(transport, loop), theirs, transport  # type: ignore[arg-type]


def _available(peer: socket.socket) -> bytes:
    try:
        return peer.recv(1 << 20)
    except BlockingIOError:
        return b""


def test_writes_of_one_loop_turn_reach_the_peer_together_at_its_end() -> None:
    async def scenario() -> tuple[bytes, bytes]:
        coalescing, peer, _ = await _pair()
        coalescing.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
        coalescing.write(b"{}")
        # A plain transport has sent the first write by now (a socket pair delivers at send()).
        before_turn_end = _available(peer)
        await asyncio.sleep(0.05)
        after = _available(peer)
        coalescing.close()
        peer.close()
        return before_turn_end, after

    held, sent = asyncio.run(scenario())
    assert held == b""
    assert sent == b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"


def test_close_sends_what_is_held_and_abort_drops_it() -> None:
    async def scenario() -> tuple[bytes, bytes]:
        closing, peer, _ = await _pair()
        closing.write(b"last words")
        closing.close()  # before the loop turned: the held bytes must still go out
        await asyncio.sleep(0.05)
        said = _available(peer)
        aborting, other_peer, _ = await _pair()
        aborting.write(b"never")
        aborting.abort()
        await asyncio.sleep(0.05)
        dropped = _available(other_peer)
        peer.close()
        other_peer.close()
        return said, dropped

    said, dropped = asyncio.run(scenario())
    assert said == b"last words"
    assert dropped == b""


def test_more_than_the_hold_limit_is_handed_on_at_once() -> None:
    async def scenario() -> tuple[int, int]:
        coalescing, peer, real = await _pair()
        coalescing.write(b"x" * 1000)
        within = coalescing.get_write_buffer_size()
        coalescing.write(b"y" * HOLD_AT_MOST)  # now past the limit, before the turn ends
        handed_on = sum(len(chunk) for chunk in iter(lambda: _available(peer), b"")) \
            + real.get_write_buffer_size()
        coalescing.close()
        peer.close()
        return within, handed_on

    within, handed_on = asyncio.run(scenario())
    assert within == 1000
    assert handed_on == 1000 + HOLD_AT_MOST


# -- a real uvicorn server with the protocol -------------------------------------------------

async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    if scope["path"] == "/stream":  # many body messages, as a streaming response sends them
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(STREAMED).encode())]})
        chunk = b"s" * 4096
        left = STREAMED
        while left:
            piece = chunk[:min(left, len(chunk))]
            left -= len(piece)
            await send({"type": "http.response.body", "body": piece, "more_body": bool(left)})
        return
    body = f'{{"path":"{scope["path"]}"}}'.encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
    if scope["path"] == "/busy":  # the loop's turn goes on after the answer (other requests)
        time.sleep(0.3)


@pytest.fixture(scope="module")
def server_port() -> Iterator[int]:
    with Served(_app, http=CoalescingHttpToolsProtocol) as served:
        # uvloop, installed with notifier: it reads before callbacks
        assert served.server.config.loop == "auto"
        yield served.port


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_pipelined_requests_get_their_answers_in_order(server_port: int) -> None:
    with socket.create_connection(("127.0.0.1", server_port), timeout=5) as sock:
        sock.sendall(b"GET /a HTTP/1.1\r\nhost: x\r\n\r\n" b"GET /b HTTP/1.1\r\nhost: x\r\n\r\n"
                     b"GET /c HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        answer = _read_all(sock)
    assert answer.count(b"HTTP/1.1 200 OK") == 3
    assert [answer.index(f'{{"path":"/{n}"}}'.encode()) for n in "abc"] == sorted(
        answer.index(f'{{"path":"/{n}"}}'.encode()) for n in "abc")
    assert answer.endswith(b'{"path":"/c"}')  # the close came after the last answer, whole


def test_a_streamed_body_arrives_whole(server_port: int) -> None:
    with socket.create_connection(("127.0.0.1", server_port), timeout=5) as sock:
        sock.sendall(b"GET /stream HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        answer = _read_all(sock)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert f"content-length: {STREAMED}".encode() in head
    assert body == b"s" * STREAMED


def test_an_answer_reaches_a_client_that_half_closed_after_asking(server_port: int) -> None:
    with socket.create_connection(("127.0.0.1", server_port), timeout=5) as sock:
        sock.sendall(b"GET /busy HTTP/1.1\r\nhost: x\r\n\r\n")
        time.sleep(0.1)  # the answer is written and held; the loop's turn is still busy
        sock.shutdown(socket.SHUT_WR)  # read by the loop before the held answer's flush
        answer = _read_all(sock)
    assert answer.startswith(b"HTTP/1.1 200 OK")
    assert answer.endswith(b'{"path":"/busy"}')
