"""The ingest routes answered by `notifier api`'s HTTP protocol (notifier.api.ingest_protocol)
against a real uvicorn server and a real redis-server, over loopback sockets.

The protocol answers the common shape of an ingest request itself and hands every other one
to ASGI; a query string is enough to send the same request through ASGI, so the table below
goes through both and compares what the client gets. The rest is what the protocol must keep
of uvicorn's cycle: answers in order when requests are pipelined, a body past uvicorn's
high-water mark, a client that leaves while its event is being accepted, shutdown, Redis down
and an unexpected error.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT

from notifier.api.app import create_app
from notifier.api.ingest import IngestRoutes
from notifier.config import settings_from_mapping
from notifier.ledger_keys import tx_key
from tests.support.served import Served
from tests.support.servers import RedisServer, free_port, wait_until
from tests.support.tcp_relay import SlowReplies

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
TOKEN = "ingest-protocol-token"
MAX_BODY = 4 * HIGH_WATER_LIMIT
CONFIG: dict[str, Any] = {
    "channels": {"sms": {"provider": "sandbox"}},
    "recipients": {"alice": {"phone": "+8613800138000"}},
    "routes": [{"match": {}, "to": ["alice"], "channels": ["sms"]}],
    "max_body_bytes": MAX_BODY,
}


def app_on(redis_url: str) -> Any:
    return create_app(settings_from_mapping({**CONFIG, "redis_url": redis_url}))


@pytest.fixture
def served(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Served]:
    monkeypatch.setenv("NOTIFIER_API_TOKEN", TOKEN)
    with Served(app_on(redis_url)) as server:
        yield server


@pytest.fixture
def asgi_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths of the ingest requests that went through ASGI (the protocol answered the rest)."""
    seen: list[str] = []
    through_asgi = IngestRoutes.__call__

    async def observed(self: IngestRoutes, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith(("/v1/alertmanager", "/v1/events")):
            seen.append(scope["path"])
        await through_asgi(self, scope, receive, send)

    monkeypatch.setattr(IngestRoutes, "__call__", observed)
    return seen


def request(path: str, body: bytes, headers: dict[str, str] | None = None, *,
            method: str = "POST") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "host: 127.0.0.1", f"content-length: {len(body)}",
             *(f"{k}: {v}" for k, v in (headers or {}).items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def bearer(token: str = TOKEN) -> dict[str, str]:
    return {"authorization": f"Bearer {token}", "content-type": "application/json"}


class Answer:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> Any:
        return json.loads(self.body)

    def shape(self) -> tuple[int, dict[str, str], str]:
        """What must be the same through both paths: transaction IDs and the date aside."""
        headers = {k: v for k, v in self.headers.items() if k != "date"}
        return self.status, headers, re.sub(r"tx-[0-9A-Z]{26}", "tx-*", self.body.decode())


def read_answers(sock: socket.socket, count: int) -> list[Answer]:
    buffer = b""
    answers: list[Answer] = []
    while len(answers) < count:
        while b"\r\n\r\n" not in buffer:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed after {len(answers)} of {count} answers"
            buffer += chunk
        head, _, buffer = buffer.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode().split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in header_lines)
        length = int(headers["content-length"])
        while len(buffer) < length:
            chunk = sock.recv(65536)
            assert chunk, "connection closed inside a body"
            buffer += chunk
        answers.append(Answer(int(status_line.split()[1]), headers, buffer[:length]))
        buffer = buffer[length:]
    return answers


def ask(served: Served, raw: bytes) -> Answer:
    with served.connect() as sock:
        sock.sendall(raw)
        return read_answers(sock, 1)[0]


def webhook(variant: str) -> dict[str, Any]:
    body = dict(json.loads((FIXTURES / "alertmanager-firing.json").read_text()))
    body["groupKey"] = f"{body['groupKey']}-{variant}"  # a new notification, not a duplicate
    return body


def encoded(payload: Any) -> bytes:
    return json.dumps(payload).encode()


# (name, path, body, headers): each is sent as is (the protocol) and with a query (ASGI)
def table(variant: str) -> list[tuple[str, str, bytes, dict[str, str]]]:
    basic = base64.b64encode(f"alertmanager:{TOKEN}".encode()).decode()
    unsupported = {**webhook(variant), "version": "3"}
    missing_field = {k: v for k, v in webhook(variant).items() if k != "alerts"}
    return [
        ("accepted", "/v1/alertmanager", encoded(webhook(variant)), bearer()),
        ("basic auth", "/v1/alertmanager", encoded(webhook(f"{variant}-basic")),
         {"authorization": f"Basic {basic}"}),
        ("no credentials", "/v1/alertmanager", encoded(webhook(variant)), {}),
        ("wrong token", "/v1/alertmanager", encoded(webhook(variant)), bearer("nope")),
        ("not JSON", "/v1/alertmanager", b"{not json", bearer()),
        ("empty", "/v1/alertmanager", b"", bearer()),
        ("old version", "/v1/alertmanager", encoded(unsupported), bearer()),
        ("missing field", "/v1/alertmanager", encoded(missing_field), bearer()),
        ("event accepted", "/v1/events", encoded({"title": f"disk {variant}", "to": ["alice"]}),
         bearer()),
        ("unknown recipient", "/v1/events", encoded({"title": "x", "to": ["mallory"]}), bearer()),
        ("long idempotency key", "/v1/events", encoded({"title": "x"}),
         {**bearer(), "idempotency-key": "k" * 201}),
    ]


def test_the_protocol_and_asgi_give_the_same_answers(served: Served, asgi_calls: list[str]) -> None:
    direct = table("direct")
    through_asgi = table("asgi")
    for (name, path, body, headers), (_, _, asgi_body, _) in zip(direct, through_asgi, strict=True):
        answered = ask(served, request(path, body, headers))
        via_asgi = ask(served, request(f"{path}?via=asgi", asgi_body, headers))
        assert answered.shape() == via_asgi.shape(), name
    assert len(asgi_calls) == len(through_asgi)  # each with a query went through ASGI, no other
    statuses = [ask(served, request(path, body, headers)).status
                for _, path, body, headers in table("again")]
    assert statuses == [200, 200, 401, 401, 400, 400, 422, 422, 202, 422, 422]


def test_an_answer_carries_a_transaction_that_is_stored(served: Served, redis_client: redis.Redis,
                                                        asgi_calls: list[str]) -> None:
    answer = ask(served, request("/v1/alertmanager", encoded(webhook("stored")), bearer()))
    again = ask(served, request("/v1/alertmanager", encoded(webhook("stored")), bearer()))
    assert answer.status == 200 and asgi_calls == []
    txid = answer.json()["transaction_id"]
    assert redis_client.hget(tx_key(txid), "status") == b"accepted"
    assert again.json() == {"transaction_id": txid, "suppressed": True}


def test_pipelined_requests_are_answered_in_order_whichever_path_each_takes(served: Served) -> None:
    with served.connect() as sock:
        sock.sendall(request("/v1/alertmanager", encoded(webhook("p1")), bearer())
                     + request("/healthz", b"", method="GET")
                     + request("/v1/alertmanager", encoded(webhook("p1")), bearer())  # its duplicate
                     + request("/v1/alertmanager?via=asgi", encoded(webhook("p3")), bearer())
                     + request("/v1/alertmanager", b"{", bearer()))
        answers = read_answers(sock, 5)
    assert [a.status for a in answers] == [200, 200, 200, 200, 400]
    first = answers[0].json()["transaction_id"]
    assert answers[1].json() == {"status": "ok"}
    assert answers[2].json() == {"transaction_id": first, "suppressed": True}
    assert answers[3].json()["transaction_id"] != first
    assert "not valid JSON" in answers[4].json()["detail"]


def test_a_body_past_uvicorns_high_water_mark_arrives_whole(served: Served,
                                                            asgi_calls: list[str]) -> None:
    big = webhook("big")
    big["commonAnnotations"] = {"description": "d" * (2 * HIGH_WATER_LIMIT)}
    raw = request("/v1/alertmanager", encoded(big), bearer())
    assert len(raw) < MAX_BODY
    with served.connect() as sock:
        for start in range(0, len(raw), 4096):  # in many reads
            sock.sendall(raw[start:start + 4096])
        [answer] = read_answers(sock, 1)
    assert answer.status == 200 and asgi_calls == []


def test_a_client_gone_while_its_event_is_accepted_leaves_the_server_serving(
        redis_server: RedisServer, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFIER_API_TOKEN", TOKEN)
    redis_client.flushall()
    late = SlowReplies(("127.0.0.1", redis_server.port), 0.5)
    try:
        with Served(app_on(f"redis://127.0.0.1:{late.port}/0")) as served:
            with served.connect() as sock:
                sock.sendall(request("/v1/alertmanager", encoded(webhook("gone")), bearer()))
            # it left; its accept call was sent, and is answered into a closed connection
            wait_until(lambda: redis_client.keys("ntf:tx:*"), timeout=5)
            answer = ask(served, request("/v1/alertmanager", encoded(webhook("next")), bearer()))
            assert answer.status == 200
    finally:
        late.close()
    assert len(redis_client.keys("ntf:tx:*")) == 2


def test_shutdown_answers_what_is_in_flight_then_closes(
        redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFIER_API_TOKEN", TOKEN)
    late = SlowReplies(("127.0.0.1", redis_server.port), 1.0)
    try:
        served = Served(app_on(f"redis://127.0.0.1:{late.port}/0")).__enter__()
        with served.connect() as sock:
            # a first call opens the link; the second request waits on Redis when shutdown begins
            assert ask(served, request("/v1/alertmanager", encoded(webhook("s1")), bearer())).status == 200
            sock.sendall(request("/v1/alertmanager", encoded(webhook("s2")), bearer()))
            wait_until(lambda: any(  # read, and waiting on Redis: not before shutdown begins
                not getattr(c.cycle, "response_complete", True)
                for c in served.server.server_state.connections))
            served.server.should_exit = True
            [answer] = read_answers(sock, 1)
            assert answer.status == 200 and answer.headers.get("connection") == "close"
            assert sock.recv(1) == b""  # then closed
        served.thread.join(15)
        assert not served.thread.is_alive()
    finally:
        late.close()


def test_redis_down_is_a_503_with_retry_after(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFIER_API_TOKEN", TOKEN)
    with Served(app_on(f"redis://127.0.0.1:{free_port()}/0")) as served:
        answer = ask(served, request("/v1/alertmanager", encoded(webhook("down")), bearer()))
        healthy = ask(served, request("/healthz", b"", method="GET"))
    assert answer.status == 503 and answer.headers["retry-after"] == "1"
    assert "redis unavailable" in answer.json()["detail"]
    assert healthy.status == 200


def test_an_unexpected_error_answers_500_and_closes_that_connection_only(
        served: Served, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def broken(*_: object) -> None:
        raise RuntimeError("a bug")

    with served.connect() as sock:
        with monkeypatch.context() as patch:  # a fault injected where a bug would raise
            patch.setattr(IngestRoutes, "submit", broken)
            sock.sendall(request("/v1/alertmanager", encoded(webhook("bug")), bearer()))
            [answer] = read_answers(sock, 1)
        assert answer.status == 500 and answer.headers["connection"] == "close"
        assert sock.recv(1) == b""
    assert "ingest request failed" in caplog.text
    with contextlib.closing(served.connect()) as sock:
        sock.sendall(request("/v1/alertmanager", encoded(webhook("after")), bearer()))
        assert read_answers(sock, 1)[0].status == 200


def test_a_request_behind_a_refused_one_is_answered_however_long_it_takes(
        redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The refusal is answered at once; the keep-alive timeout must not start then, while the
    request behind it (same segment) still waits for Redis."""
    monkeypatch.setenv("NOTIFIER_API_TOKEN", TOKEN)
    late = SlowReplies(("127.0.0.1", redis_server.port), 2.0)
    try:
        with Served(app_on(f"redis://127.0.0.1:{late.port}/0"), timeout_keep_alive=1) as served, \
                served.connect() as sock:
            sock.sendall(request("/v1/alertmanager", encoded(webhook("r1")), bearer("nope"))
                         + request("/v1/alertmanager", encoded(webhook("r2")), bearer()))
            answers = read_answers(sock, 2)
    finally:
        late.close()
    assert [a.status for a in answers] == [401, 200]


def test_nothing_behind_an_answer_that_closes_the_connection_is_accepted(
        served: Served, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 500 closes the connection: a request pipelined behind it is not read, so it is not
    stored either (its sender, never answered, sends it again)."""
    submit = IngestRoutes.submit

    def broken_for_the_first(self: IngestRoutes, path: str, body: bytes, headers: Any) -> Any:
        if b"first" in body:  # a fault injected where a bug would raise
            raise RuntimeError("a bug")
        return submit(self, path, body, headers)

    monkeypatch.setattr(IngestRoutes, "submit", broken_for_the_first)
    with served.connect() as sock:
        sock.sendall(request("/v1/alertmanager", encoded(webhook("first")), bearer())
                     + request("/v1/alertmanager", encoded(webhook("second")), bearer()))
        [answer] = read_answers(sock, 1)
        assert answer.status == 500 and sock.recv(1) == b""
    assert redis_client.keys("ntf:tx:*") == []
