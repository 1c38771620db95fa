"""An ASGI app served as `notifier api` serves it (uvicorn with notifier's HTTP protocol), on a
thread of the test process: the ingest routes then take the protocol's own path
(notifier.api.ingest_protocol), which an in-process ASGI client never reaches."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import uvicorn

from notifier.api.ingest_protocol import IngestHttpProtocol
from tests.support.servers import free_port, wait_until


class Served:
    def __init__(self, app: Any, **options: Any) -> None:
        """`options`: more of uvicorn's (`http` replaces `notifier api`'s protocol)."""
        self.app = app
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_config=None, access_log=False,
            proxy_headers=False, **{"http": IngestHttpProtocol, **options}))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Served:
        self.thread.start()
        wait_until(lambda: self.server.started or not self.thread.is_alive())
        assert self.server.started, "uvicorn did not start"
        return self

    def __exit__(self, *_: object) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        assert not self.thread.is_alive(), "uvicorn did not stop"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)


class ServedClient(httpx.Client):
    """An httpx client of a served app; `app` is the app, as TestClient has it."""

    app: Any


@contextmanager
def served_client(app: Any, headers: dict[str, str] | None = None) -> Iterator[ServedClient]:
    with Served(app) as served, ServedClient(base_url=served.url, headers=headers,
                                             timeout=15) as client:
        client.app = app
        yield client
