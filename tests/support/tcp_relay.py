"""A loopback TCP relay in front of a real server, for tests that need the network between to
misbehave (answers lost, answers late). A subclass decides what each direction forwards."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable

Forward = Callable[[bytes], None]


class LoopbackServer:
    """Listens on a free loopback port (`port`) until `close`; each connection is `serve`d in a
    thread of its own. Subclasses say what serving one is."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def serve(self, client: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.server.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self.serve, args=(client,), daemon=True).start()


class Relay(LoopbackServer):
    """Each connection gets its own one to `upstream` and a thread per direction, forwarding
    through `forwarders` (identity by default)."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        super().__init__()

    def forwarders(self, to_server: socket.socket, to_client: socket.socket
                   ) -> tuple[Forward, Forward]:
        """(what the client sends -> the server, what the server answers -> the client)."""
        return to_server.sendall, to_client.sendall

    def serve(self, client: socket.socket) -> None:
        upstream = socket.create_connection(self.upstream)
        requests, replies = self.forwarders(upstream, client)
        threading.Thread(target=_pump, args=(client, upstream, requests), daemon=True).start()
        _pump(upstream, client, replies)


def _pump(src: socket.socket, dst: socket.socket, forward: Forward) -> None:
    try:
        while data := src.recv(65536):
            forward(data)
    except OSError:
        pass
    finally:
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()


class SlowReplies(Relay):
    """A server that answers late: the first reply chunk after each request of the client (and
    the greeting) is held `delay` seconds, the rest forwarded as is. `first_only`: only the
    connection's first reply is late (a loaded server slow to greet)."""

    def __init__(self, upstream: tuple[str, int], delay: float, *, first_only: bool = False) -> None:
        super().__init__(upstream)
        self.delay, self.first_only = delay, first_only

    def forwarders(self, to_server: socket.socket, to_client: socket.socket
                   ) -> tuple[Forward, Forward]:
        owed = threading.Event()  # a reply is due late: the greeting, then one per request
        owed.set()

        def request(data: bytes) -> None:
            if not self.first_only:
                owed.set()
            to_server.sendall(data)

        def reply(data: bytes) -> None:
            if owed.is_set():
                owed.clear()
                time.sleep(self.delay)
            to_client.sendall(data)

        return request, reply
