"""A real SMTP server (aiosmtpd) on loopback for tests, with scriptable refusals.

In-process::

    fake = FakeSmtp(tls="starttls", auth=("alice", "s3cret"))
    fake.start()
    fake.script("rcpt", "451 4.3.0 try again later")      # the next RCPT gets this
    fake.script("data", "421 4.3.2 shutting down", close=True)
    ... fake.port, fake.messages (email.message.EmailMessage), fake.envelopes
    fake.stop()

Standalone: ``python -m tests.fakes.smtp --port N --control-port M [--tls none|starttls|tls]
[--auth user:password]`` with a JSON control API on 127.0.0.1:M:
``GET /_fake/messages`` (from/to/subject/headers/text/html), ``POST /_fake/script``
(``{"stage": "rcpt", "reply": "550 5.1.1 no such user", "close": false, "hang": 0}`` or a list),
``POST /_fake/reset``.

AUTH is only offered over TLS (aiosmtpd's auth_require_tls): that is how real submission
servers behave, and it keeps aiosmtpd from warning (pytest runs with warnings as errors).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import tempfile
import threading
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, Literal

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from tests.fakes.http_server import QuietHTTPServer
from tests.support.servers import free_port
from tests.support.tls import server_tls_context

Stage = Literal["mail", "rcpt", "data"]
TlsMode = Literal["none", "starttls", "tls"]


@dataclass
class Fault:
    """The next command at `stage` is answered with `reply` (after `hang` seconds). At `data`,
    an empty `reply` queues the message at once and answers 250 only after `hang` (a server
    slow to confirm what it already has)."""

    stage: Stage
    reply: str
    close: bool = False  # drop the connection right after the reply (a 421 does that)
    hang: float = 0.0


class _Handler:
    def __init__(self, fake: FakeSmtp) -> None:
        self.fake = fake

    async def _fault(self, server: SMTP, stage: Stage) -> str | None:
        fault = self.fake._next_fault(stage)
        return None if fault is None else await self._answer(server, fault)

    async def _answer(self, server: SMTP, fault: Fault) -> str:
        if fault.hang:
            await asyncio.sleep(fault.hang)
        if fault.close and server.transport is not None:
            # Runs after aiosmtpd has written the reply this hook returns; close() flushes it.
            server.loop.call_soon(server.transport.close)
        return fault.reply

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        reply = await self._fault(server, "mail")
        if reply is not None:
            return reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        reply = await self._fault(server, "rcpt")
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        late = self.fake._next_fault("data")
        if late is not None and late.reply:
            return await self._answer(server, late)
        raw = envelope.original_content or b""
        parsed = BytesParser(policy=policy.default).parsebytes(raw)
        assert isinstance(parsed, EmailMessage)
        self.fake._record(parsed, envelope.mail_from or "", list(envelope.rcpt_tos))
        if late is not None:  # queued; the answer comes late
            await asyncio.sleep(late.hang)
        return "250 2.0.0 Ok: queued"


class _Controller(Controller):
    def factory(self) -> SMTP:
        # Pass our loop: aiosmtpd would otherwise look one up under a global warnings filter.
        smtp = SMTP(self.handler, loop=self.loop, **self.SMTP_kwargs)
        if self.ssl_context is not None:
            # aiosmtpd only counts STARTTLS as TLS for auth_require_tls; on an implicit-TLS
            # listener every byte is already encrypted. Set after construction, because
            # passing auth_require_tls=False warns (and warnings are errors under pytest).
            smtp._auth_require_tls = False
        return smtp


class FakeSmtp:
    def __init__(
        self, tls: TlsMode = "none", auth: tuple[str, str] | None = None, port: int | None = None,
        data_size_limit: int | None = None,
    ) -> None:
        self.tls = tls
        # The SIZE the server advertises (aiosmtpd's default: 32 MiB); a MAIL FROM declaring
        # more is answered 552, as RFC 1870 says.
        self.data_size_limit = data_size_limit
        self.auth = auth
        self.port = port or free_port()
        self.messages: list[EmailMessage] = []
        self.envelopes: list[tuple[str, list[str]]] = []  # (MAIL FROM, RCPT TOs) per message
        self.logins: list[str] = []  # usernames that authenticated
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self._dir: tempfile.TemporaryDirectory[str] | None = None  # made by start()
        self._controller: _Controller | None = None

    @property
    def cert_path(self) -> Path:
        """The server certificate (TLS modes, once started)."""
        assert self._dir is not None, "start() first"
        return Path(self._dir.name) / "cert.pem"

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        ok = (
            self.auth is not None
            and isinstance(data, LoginPassword)
            and (data.login.decode(), data.password.decode()) == self.auth
        )
        if ok:
            with self._lock:
                self.logins.append(data.login.decode())
        return AuthResult(success=ok, handled=False)

    def start(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="fake-smtp-")
        context = server_tls_context(Path(self._dir.name)) if self.tls != "none" else None
        kwargs: dict[str, Any] = {
            "hostname": "127.0.0.1",
            "port": self.port,
            "server_hostname": "fake-smtp.localhost",
            "ready_timeout": 10.0,
        }
        if self.data_size_limit is not None:
            kwargs["data_size_limit"] = self.data_size_limit
        if self.tls == "tls":
            kwargs["ssl_context"] = context
        elif self.tls == "starttls":
            kwargs.update(tls_context=context, require_starttls=True)
        if self.auth is not None:
            kwargs.update(
                authenticator=self._authenticate, auth_required=True, auth_require_tls=True
            )
        self._controller = _Controller(_Handler(self), **kwargs)
        self._controller.start()

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> FakeSmtp:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def script(
        self, stage: Stage, reply: str, *, close: bool = False, hang: float = 0.0, times: int = 1
    ) -> None:
        with self._lock:
            self._faults.extend(Fault(stage, reply, close, hang) for _ in range(times))

    def reset(self) -> None:
        with self._lock:
            self._faults.clear()
            self.messages.clear()
            self.envelopes.clear()
            self.logins.clear()

    def faults_left(self) -> int:
        """Scripted faults not taken yet (one taken is under way, or done)."""
        with self._lock:
            return len(self._faults)

    def _next_fault(self, stage: Stage) -> Fault | None:
        with self._lock:
            for i, fault in enumerate(self._faults):
                if fault.stage == stage:
                    return self._faults.pop(i)
        return None

    def _record(self, message: EmailMessage, mail_from: str, rcpt_tos: list[str]) -> None:
        with self._lock:
            self.messages.append(message)
            self.envelopes.append((mail_from, rcpt_tos))

    def snapshot(self) -> list[dict[str, Any]]:
        """The messages as JSON-able dicts (the control API's GET /_fake/messages)."""
        with self._lock:
            pairs = list(zip(self.messages, self.envelopes, strict=True))
        return [describe(message, mail_from, rcpt) for message, (mail_from, rcpt) in pairs]


def _part(message: EmailMessage, subtype: str) -> str | None:
    body = message.get_body(preferencelist=(subtype,))
    return None if body is None else str(body.get_content())


def describe(message: EmailMessage, mail_from: str, rcpt_tos: list[str]) -> dict[str, Any]:
    return {
        "from": mail_from,
        "to": rcpt_tos,
        "subject": str(message["Subject"] or ""),
        "headers": {name: str(value) for name, value in message.items()},
        "text": _part(message, "plain"),
        "html": _part(message, "html"),
    }


def _control_handler(fake: FakeSmtp) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _reply(self, status: int, payload: Any) -> None:
            body = json.dumps(payload, ensure_ascii=False).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path == "/_fake/messages":
                self._reply(200, fake.snapshot())
            elif self.path == "/_fake/health":
                self._reply(200, {"port": fake.port, "tls": fake.tls})
            else:
                self._reply(404, {"error": "not found"})

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.path == "/_fake/reset":
                fake.reset()
                self._reply(200, {"ok": True})
            elif self.path == "/_fake/script":
                data = json.loads(raw or b"[]")
                for item in data if isinstance(data, list) else [data]:
                    fake.script(
                        item["stage"], item["reply"], close=bool(item.get("close", False)),
                        hang=float(item.get("hang", 0)), times=int(item.get("times", 1)),
                    )
                self._reply(200, {"ok": True})
            else:
                self._reply(404, {"error": "not found"})

    return Handler


def serve_control(fake: FakeSmtp, port: int) -> QuietHTTPServer:
    server = QuietHTTPServer(("127.0.0.1", port), _control_handler(fake))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--control-port", type=int, required=True)
    parser.add_argument("--tls", choices=("none", "starttls", "tls"), default="none")
    parser.add_argument("--auth", help="user:password required over TLS")
    args = parser.parse_args(argv)
    auth: tuple[str, str] | None = None
    if args.auth:
        user, _, password = args.auth.partition(":")
        auth = (user, password)
    fake = FakeSmtp(tls=args.tls, auth=auth, port=args.port)
    fake.start()
    control = serve_control(fake, args.control_port)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    print(f"fake smtp on 127.0.0.1:{fake.port} control http://127.0.0.1:{args.control_port}",
          flush=True)
    while not done.wait(0.5):
        pass
    control.shutdown()
    control.server_close()
    fake.stop()


if __name__ == "__main__":
    main()
