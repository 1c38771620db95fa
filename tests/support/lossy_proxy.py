"""A TCP proxy to Redis that loses the answers to script calls: what a stalled network, or a
Redis slower than the client's socket timeout, looks like to the client after it sent one."""

from __future__ import annotations

import socket
import threading

from tests.support.tcp_relay import Forward, Relay


class LosesScriptReplies(Relay):
    """Forwards every command. While `lose` is above 0, a connection that sends an EVALSHA gets
    nothing back from then on (Redis still runs the script), and `lose` goes down by one."""

    def __init__(self, upstream: tuple[str, int], lose: int) -> None:
        self.lose = lose
        self._lock = threading.Lock()
        super().__init__(upstream)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def forwarders(self, to_server: socket.socket, to_client: socket.socket
                   ) -> tuple[Forward, Forward]:
        muted = threading.Event()

        def request(data: bytes) -> None:
            if b"EVALSHA" in data and self._take_one():
                muted.set()
            to_server.sendall(data)

        def reply(data: bytes) -> None:
            if not muted.is_set():
                to_client.sendall(data)

        return request, reply

    def _take_one(self) -> bool:
        with self._lock:
            if self.lose <= 0:
                return False
            self.lose -= 1
            return True
