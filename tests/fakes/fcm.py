"""A fake FCM HTTP v1 endpoint plus the OAuth2 token endpoint it trusts, on loopback.

The token endpoint verifies the JWT-bearer assertion for real (RS256 signature with the
service account's public key, aud == token_uri, scope, iss, exp); messages:send checks the
bearer token and the body like FCM does and records what it accepted.

In-process::

    fake = FakeFcm(project_id="demo"); fake.start()
    fake.write_service_account(tmp_path / "sa.json")   # token_uri points at this fake
    fake.script(status=404, error_code="UNREGISTERED")  # the next messages:send answers so
    fake.script(target="token", status=400)             # the next token request fails
    ... fake.messages, fake.token_requests, fake.expire_tokens(), fake.stop()

Standalone: ``python -m tests.fakes.fcm --port N --key-file PATH [--project demo]`` (writes
the key file if missing). Control API on the same port: ``GET /_fake/messages``,
``POST /_fake/script`` (a fault object or a list, keys as `Fault`), ``POST /_fake/reset``,
``POST /_fake/expire-tokens``, ``POST /_fake/unregister`` ``{"token": ...}``,
``GET /_fake/stats``.
"""

from __future__ import annotations

import argparse
import json
import secrets
import signal
import threading
import time
from dataclasses import dataclass, field, fields
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.fakes.fcm_protocol import (
    JWT_BEARER,
    check_assertion,
    default_key,
    error_body,
    validate_message,
    write_service_account,
)
from tests.fakes.http_server import QuietHTTPServer


@dataclass
class Fault:
    """One scripted answer. `target` is "send" (messages:send) or "token"."""

    target: str = "send"
    status: int | None = None  # None: answer as usual (after `hang`)
    error_code: str | None = None  # FcmError errorCode, e.g. UNREGISTERED
    body: Any = None  # exact body to return instead of the standard one
    retry_after: str | None = None
    hang: float = 0.0  # seconds to stall before answering (client timeouts)
    drop: bool = False  # close the connection without any answer


@dataclass
class FakeFcm:
    project_id: str = "demo"
    key: rsa.RSAPrivateKey = field(default_factory=default_key, repr=False)
    client_email: str = "notifier@demo.iam.gserviceaccount.com"
    port: int = 0
    token_lifetime: int = 3600
    token_uri: str | None = None  # default: this fake's /token

    def __post_init__(self) -> None:
        # Accepted request bodies as POSTed: {"message": {"token": ..., ...}}.
        self.messages: list[dict[str, Any]] = []
        self.token_requests = 0
        self.send_requests = 0
        self.unregistered: set[str] = set()
        self._tokens: dict[str, float] = {}  # access token -> expiry (epoch)
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()  # cuts hangs short on stop/reset
        self._server: QuietHTTPServer | None = None

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        self._wake.clear()
        self._server = QuietHTTPServer(("127.0.0.1", self.port), _make_handler(self))
        self._server.daemon_threads = True
        self._server.block_on_close = False  # a hanging handler must not block stop()
        self.port = self._server.server_address[1]
        threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()

    def stop(self) -> None:
        self._wake.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeFcm:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def expected_token_uri(self) -> str:
        return self.token_uri or f"{self.url}/token"

    def write_service_account(self, path: str | Path) -> dict[str, str]:
        return write_service_account(
            path, self.expected_token_uri, project_id=self.project_id, key=self.key,
            client_email=self.client_email,
        )

    # -- scripting ---------------------------------------------------------------------
    def script(self, **fault: Any) -> None:
        with self._lock:
            self._faults.append(Fault(**fault))

    def reset(self) -> None:
        self._wake.set()
        with self._lock:
            self._faults.clear()
            self.messages.clear()
            self.unregistered.clear()
            self._tokens.clear()
            self.token_requests = self.send_requests = 0
        self._wake = threading.Event()

    def expire_tokens(self) -> None:
        """Every access token issued so far stops working (as after a key rotation)."""
        with self._lock:
            self._tokens.clear()

    def unregister(self, device_token: str) -> None:
        with self._lock:
            self.unregistered.add(device_token)

    def _next_fault(self, target: str) -> Fault | None:
        with self._lock:
            for i, fault in enumerate(self._faults):
                if fault.target == target:
                    return self._faults.pop(i)
        return None

    # -- the two endpoints -------------------------------------------------------------
    def token(self, form: dict[str, str]) -> tuple[int, Any]:
        if form.get("grant_type") != JWT_BEARER:
            return 400, {"error": "unsupported_grant_type", "error_description": "grant_type"}
        problem = check_assertion(
            form.get("assertion", ""), self.key.public_key(), self.expected_token_uri,
            self.client_email,
        )
        if problem:
            return 400, {"error": "invalid_grant", "error_description": problem}
        value = "ya29.fake-" + secrets.token_urlsafe(32)
        with self._lock:
            self._tokens[value] = time.time() + self.token_lifetime
        return 200, {"access_token": value, "expires_in": self.token_lifetime,
                     "token_type": "Bearer"}

    def send(self, project: str, authorization: str, raw: bytes) -> tuple[int, Any]:
        token = authorization.removeprefix("Bearer ").strip()
        with self._lock:
            expiry = self._tokens.get(token) if authorization.startswith("Bearer ") else None
        if expiry is None or expiry < time.time():
            return 401, error_body(401, message=(
                "Request had invalid authentication credentials. Expected OAuth 2 access token, "
                "login cookie or other valid authentication credential."))
        if project != self.project_id:
            return 404, error_body(404, message="Requested entity was not found.")
        try:
            body = json.loads(raw)
        except ValueError:
            return 400, error_body(400, message="Invalid JSON payload received.")
        problem = validate_message(body)
        if problem:
            return 400, error_body(400, "INVALID_ARGUMENT", problem)
        message = body["message"]
        if message.get("token") in self.unregistered:
            return 404, error_body(404, "UNREGISTERED", "Requested entity was not found.")
        with self._lock:
            self.messages.append(body)
            name = f"projects/{self.project_id}/messages/0:{len(self.messages)}%fake"
        return 200, {"name": name}

    def fault_answer(self, fault: Fault) -> tuple[int, Any]:
        assert fault.status is not None
        if fault.body is not None:
            return fault.status, fault.body
        if fault.target == "token":
            kind = "invalid_grant" if fault.status < 500 else "internal_failure"
            return fault.status, {"error": kind, "error_description": "scripted"}
        if fault.status == 502:
            return 502, "<html><title>Error 502 (Server Error)!!1</title></html>"
        return fault.status, error_body(fault.status, fault.error_code, "scripted fault")


def _make_handler(fake: FakeFcm) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _reply(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
            is_text = isinstance(payload, str)
            body = payload.encode() if is_text else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/html" if is_text else "application/json")
            self.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path == "/_fake/messages":
                with fake._lock:
                    messages = list(fake.messages)
                self._reply(200, messages)
            elif self.path == "/_fake/stats":
                self._reply(200, {"token_requests": fake.token_requests,
                                  "send_requests": fake.send_requests})
            else:
                self._reply(404, error_body(404, message="not found"))

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            path = self.path
            if path.startswith("/_fake/"):
                self._control(path, raw)
                return
            if path == "/token":
                target = "token"
            elif path.startswith("/v1/projects/") and path.endswith("/messages:send"):
                target = "send"
            else:
                self._reply(404, error_body(404, message="not found"))
                return
            with fake._lock:  # every request counts, scripted or not
                if target == "token":
                    fake.token_requests += 1
                else:
                    fake.send_requests += 1
            fault = fake._next_fault(target)
            if fault is not None:
                if fault.hang:
                    fake._wake.wait(fault.hang)
                if fault.drop:
                    self.close_connection = True
                    return  # no status line at all: the client sees a dropped connection
                if fault.status is not None:
                    status, payload = fake.fault_answer(fault)
                    extra = {"Retry-After": fault.retry_after} if fault.retry_after else None
                    self._reply(status, payload, extra)
                    return
            if target == "token":
                form = {k: v[0] for k, v in parse_qs(raw.decode()).items()}
                self._reply(*fake.token(form))
            else:
                project = path.removeprefix("/v1/projects/").removesuffix("/messages:send")
                self._reply(*fake.send(project, self.headers.get("Authorization", ""), raw))

        def _control(self, path: str, raw: bytes) -> None:
            if path == "/_fake/script":
                data = json.loads(raw or b"[]")
                known = {f.name for f in fields(Fault)}
                for item in data if isinstance(data, list) else [data]:
                    fake.script(**{k: v for k, v in item.items() if k in known})
            elif path == "/_fake/reset":
                fake.reset()
            elif path == "/_fake/expire-tokens":
                fake.expire_tokens()
            elif path == "/_fake/unregister":
                fake.unregister(json.loads(raw)["token"])
            else:
                self._reply(404, error_body(404, message="not found"))
                return
            self._reply(200, {"ok": True})

    return Handler


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="fake FCM HTTP v1 + OAuth token endpoint")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--key-file", required=True)
    parser.add_argument("--project", default="demo")
    args = parser.parse_args(argv)
    key_file = Path(args.key_file)
    if key_file.exists():
        info = json.loads(key_file.read_text(encoding="utf-8"))
        key = serialization.load_pem_private_key(info["private_key"].encode(), None)
        assert isinstance(key, rsa.RSAPrivateKey)
        fake = FakeFcm(project_id=args.project, key=key, client_email=info["client_email"],
                       port=args.port, token_uri=info["token_uri"])
        fake.start()
    else:
        fake = FakeFcm(project_id=args.project, port=args.port,
                       client_email=f"notifier@{args.project}.iam.gserviceaccount.com")
        fake.start()
        fake.write_service_account(key_file)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    print(f"fake fcm on {fake.url} (project {fake.project_id}, key file {key_file})", flush=True)
    while not done.wait(0.5):
        pass
    fake.stop()


__all__ = ["FakeFcm", "Fault", "write_service_account"]

if __name__ == "__main__":
    main()
