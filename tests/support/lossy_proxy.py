"""A TCP proxy to Redis that loses the answers to script calls: what a stalled network, or a
Redis slower than the client's socket timeout, looks like to the client after it sent one."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable


class LosesScriptReplies:
    """Forwards every command. While `lose` is above 0, a connection that sends an EVALSHA gets
    nothing back from then on (Redis still runs the script), and `lose` goes down by one."""

    def __init__(self, upstream: tuple[str, int], lose: int) -> None:
        self.upstream = upstream
        self.lose = lose
        self._lock = threading.Lock()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            muted = threading.Event()
            threading.Thread(target=self._requests, args=(client, upstream, muted), daemon=True).start()
            threading.Thread(target=self._replies, args=(upstream, client, muted), daemon=True).start()

    def _requests(self, src: socket.socket, dst: socket.socket, muted: threading.Event) -> None:
        def forward(data: bytes) -> None:
            if b"EVALSHA" in data and self._take_one():
                muted.set()
            dst.sendall(data)
        _pump(src, dst, forward)

    def _replies(self, src: socket.socket, dst: socket.socket, muted: threading.Event) -> None:
        def forward(data: bytes) -> None:
            if not muted.is_set():
                dst.sendall(data)
        _pump(src, dst, forward)

    def _take_one(self) -> bool:
        with self._lock:
            if self.lose <= 0:
                return False
            self.lose -= 1
            return True

    def close(self) -> None:
        self.server.close()


def _pump(src: socket.socket, dst: socket.socket, forward: Callable[[bytes], None]) -> None:
    try:
        while data := src.recv(65536):
            forward(data)
    except OSError:
        pass
    finally:
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.close()
