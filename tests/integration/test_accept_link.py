"""The API's own Redis connection for the accept script (notifier.api.script_batch) against real
redis-servers: what the URL says (password, db, TLS) holds, a bad password is a 503 that does not
echo it, and a Redis restart between accepts (new connection, script cache empty) loses nothing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from fastapi.testclient import TestClient

from notifier.api.app import create_app
from notifier.config import settings_from_mapping
from notifier.tasks_spec import DISPATCH_QUEUE
from tests.support.servers import RedisServer, free_port
from tests.support.tls import write_cert

CONFIG: dict[str, Any] = {
    "channels": {"email": {"provider": "sandbox"}},
    "recipients": {"alice": {"email": "alice@example.com"}},
    "routes": [{"match": {}, "to": ["alice"], "channels": ["email"]}],
}
PASSWORD = "redis-pass-6f1c"


@pytest.fixture(autouse=True)
def _open_api(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFIER_API_TOKEN", raising=False)


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[RedisServer]:
    options: dict[str, Any] = {"appendfsync": "always", **getattr(request, "param", {})}  # it is crashed
    redis_server = RedisServer(**options)
    redis_server.start()
    yield redis_server
    redis_server.close()


def accept(url: str, *titles: str) -> list[Any]:
    app = create_app(settings_from_mapping({**CONFIG, "redis_url": url}))
    with TestClient(app) as client:
        return [client.post("/v1/events", json={"title": title}) for title in titles]


@pytest.mark.parametrize("server", [{"password": PASSWORD}], indirect=True)
def test_password_and_db_come_from_the_url(server: RedisServer) -> None:
    [response] = accept(f"redis://:{PASSWORD}@127.0.0.1:{server.port}/3", "into db 3")
    assert response.status_code == 202
    txid = response.json()["transaction_id"]
    db3 = redis.Redis(port=server.port, password=PASSWORD, db=3)
    db0 = redis.Redis(port=server.port, password=PASSWORD, db=0)
    assert db3.hget(f"ntf:tx:{txid}", "status") == b"accepted"
    assert db3.llen(DISPATCH_QUEUE) == 1 and db0.dbsize() == 0


@pytest.mark.parametrize("server", [{"password": PASSWORD}], indirect=True)
def test_a_wrong_password_is_a_503_that_does_not_echo_it(server: RedisServer) -> None:
    wrong = "not-the-pass-91d2"
    [response] = accept(f"redis://:{wrong}@127.0.0.1:{server.port}/0", "refused")
    assert response.status_code == 503 and response.headers["Retry-After"] == "1"
    assert "redis unavailable" in response.json()["detail"]
    assert wrong not in response.text and PASSWORD not in response.text
    assert redis.Redis(port=server.port, password=PASSWORD).dbsize() == 0


def test_tls_url_with_its_ca(tmp_path: Path) -> None:
    cert, key = write_cert(tmp_path)
    tls_port = free_port()
    server = RedisServer(extra_args=["--tls-port", str(tls_port), "--tls-cert-file", str(cert),
                                     "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert),
                                     "--tls-auth-clients", "no"])
    server.start()
    try:
        url = f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={cert}&ssl_cert_reqs=required"
        [response] = accept(url, "over tls")
        assert response.status_code == 202
        txid = response.json()["transaction_id"]
        assert redis.Redis(port=server.port).hget(f"ntf:tx:{txid}", "status") == b"accepted"
        # ...and the certificate is checked: without its CA the same server is refused.
        [untrusted] = accept(f"rediss://127.0.0.1:{tls_port}/0?ssl_cert_reqs=required", "untrusted")
        assert untrusted.status_code == 503
    finally:
        server.close()


def test_a_redis_restart_between_accepts_loses_nothing(server: RedisServer) -> None:
    app = create_app(settings_from_mapping({**CONFIG, "redis_url": server.url}))
    with TestClient(app) as client:
        before = client.post("/v1/events", json={"title": "before the crash"})
        server.kill()  # the API's connection breaks; the restarted Redis has no scripts cached
        server.start()
        after = client.post("/v1/events", json={"title": "after the restart"})
    assert before.status_code == after.status_code == 202
    check = redis.Redis(port=server.port)
    queued = [json.loads(m)["headers"]["argsrepr"] for m in check.lrange(DISPATCH_QUEUE, 0, -1)]
    assert sorted(queued) == sorted(repr([r.json()["transaction_id"]]) for r in (before, after))


class ImpostorRedis:
    """A TCP server on loopback that answers every command the same wrong way."""

    def __init__(self, reply: bytes | None) -> None:
        self.reply = reply  # None: close the connection as soon as a command arrives
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.server.accept()
                threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            while conn.recv(65536):
                if self.reply is None:
                    return
                conn.sendall(self.reply)

    def close(self) -> None:
        self.server.close()


@pytest.mark.parametrize("reply", [b"+OK\r\n", b"*1\r\n$3\r\nnew\r\n", b"HTTP/1.1 400 Bad\r\n\r\n", None],
                         ids=["status", "short-array", "not-resp", "hang-up"])
def test_something_that_is_not_redis_gets_503s_never_a_500(reply: bytes | None) -> None:
    impostor = ImpostorRedis(reply)
    try:
        app = create_app(settings_from_mapping({**CONFIG, "redis_url":
                                                f"redis://127.0.0.1:{impostor.port}/0"}))
        with TestClient(app) as client:
            for attempt in range(2):  # the second on a fresh connection
                response = client.post("/v1/events", json={"title": f"attempt {attempt}"})
                assert response.status_code == 503, response.text
                assert "redis unavailable" in response.json()["detail"]
            # and the scrape still answers (its Redis figures left out), for the alert on it
            assert client.get("/metrics").status_code == 200
    finally:
        impostor.close()



def test_a_demoted_master_answers_503_not_a_hung_request(server: RedisServer) -> None:
    # The master became a replica (a failover): it answers the accept script READONLY. That
    # request must hear of it like the others on the link, not wait for ever.
    redis.Redis(port=server.port).replicaof("127.0.0.1", free_port())
    app = create_app(settings_from_mapping({**CONFIG, "redis_url": server.url}))

    async def post(title: str) -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as client:
            return await asyncio.wait_for(client.post("/v1/events", json={"title": title}), 10)

    response = asyncio.run(post("to a replica"))
    assert response.status_code == 503, response.text
    assert "ReadOnlyError" in response.json()["detail"]
    redis.Redis(port=server.port).replicaof("NO", "ONE")  # promoted: the next call finds it
    assert asyncio.run(post("promoted")).status_code == 202
