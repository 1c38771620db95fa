"""FcmPush against the fake FCM (real JWT verification, real HTTP) on loopback."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from cryptography.hazmat.primitives.asymmetric import rsa

from notifier.channels.base import ChannelContext
from notifier.channels.push_fcm import FcmPush
from notifier.config import FcmProvider
from notifier.errors import DeliveryError, MaybeSentError, PermanentError, TransientError
from notifier.models import ErrorClass, Outgoing, Receipt, Rendered
from tests.fakes.fcm import FakeFcm, write_service_account
from tests.support.channel_calls import send_error, send_now
from tests.support.servers import clean_env, free_port

Factory = Callable[..., FcmPush]


def outgoing(address: str = "tok-alice", **kw: Any) -> Outgoing:
    fields: dict[str, Any] = {
        "delivery_id": "dlv-7", "transaction_id": "tx-0007", "address": address,
        "kind": "alert", "rendered": Rendered(subject="磁盘告警", text="db-1 磁盘 97%"),
        "data": {"severity": "critical"},
    }
    fields.update(kw)
    return Outgoing(**fields)


def send(channel: FcmPush, message: Outgoing | None = None) -> Receipt:
    return send_now(channel, message or outgoing())


def fails(channel: FcmPush, message: Outgoing | None = None) -> DeliveryError:
    return send_error(channel, message or outgoing())


@pytest.fixture
def fake() -> Iterator[FakeFcm]:
    with FakeFcm(project_id="demo") as server:
        yield server


@pytest.fixture
def channel_for(tmp_path: Path) -> Iterator[Factory]:
    client = redis.Redis(port=free_port())  # never used: push needs no Redis

    def make(fake: FakeFcm, key_file: Path | None = None, **config: Any) -> FcmPush:
        if key_file is None:
            key_file = tmp_path / "service-account.json"
            fake.write_service_account(key_file)
        settings = {"provider": "fcm", "project_id": "demo", "endpoint": fake.url,
                    "credentials_file": str(key_file), "timeout": 5, **config}
        return FcmPush(FcmProvider(**settings), ChannelContext(redis=client))

    yield make
    client.close()


def test_a_push_goes_out_with_the_v1_body(fake: FakeFcm, channel_for: Factory) -> None:
    receipt = send(channel_for(fake))
    assert receipt.provider_message_id.startswith("projects/demo/messages/")
    assert fake.messages == [{"message": {
        "token": "tok-alice",
        "notification": {"title": "磁盘告警", "body": "db-1 磁盘 97%"},
        "data": {"severity": "critical", "transaction_id": "tx-0007", "delivery_id": "dlv-7"},
        "android": {"priority": "high"},
        "apns": {"headers": {"apns-priority": "10"}},
    }}]


def test_our_ids_win_over_sender_data(fake: FakeFcm, channel_for: Factory) -> None:
    send(channel_for(fake), outgoing(data={"transaction_id": "forged"}))
    assert fake.messages[0]["message"]["data"]["transaction_id"] == "tx-0007"


def test_the_token_is_fetched_once_and_cached(fake: FakeFcm, channel_for: Factory) -> None:
    channel = channel_for(fake)
    for _ in range(3):
        send(channel)  # each on a fresh event loop, as after a worker restart of the loop
    assert (fake.token_requests, len(fake.messages)) == (1, 3)
    assert channel.token_fetches == 1


def test_a_token_close_to_expiry_is_renewed(fake: FakeFcm, channel_for: Factory) -> None:
    fake.token_lifetime = 120  # shorter than the refresh margin: never worth reusing
    channel = channel_for(fake)
    send(channel)
    send(channel)
    assert fake.token_requests == 2


def test_a_revoked_token_is_refreshed_once_and_the_send_retried(
    fake: FakeFcm, channel_for: Factory
) -> None:
    channel = channel_for(fake)
    send(channel)
    fake.expire_tokens()  # FCM now answers 401 UNAUTHENTICATED to the cached token
    send(channel)
    assert (fake.token_requests, fake.send_requests, len(fake.messages)) == (2, 3, 2)


def test_a_401_that_survives_a_fresh_token_is_an_account_failure(
    fake: FakeFcm, channel_for: Factory
) -> None:
    fake.script(status=401)
    fake.script(status=401)
    error = fails(channel_for(fake))
    assert (error.error_class, error.code) == (ErrorClass.ACCOUNT, "UNAUTHENTICATED")
    assert (fake.token_requests, fake.send_requests) == (2, 2)


def test_third_party_auth_error_fails_that_token_only_without_a_token_refresh(
    fake: FakeFcm, channel_for: Factory
) -> None:
    """Bad APNs / web-push credentials: that token's send is permanent (its fallback carries
    it), not an account error that would open the breaker for Android tokens too."""
    fake.script(status=401, error_code="THIRD_PARTY_AUTH_ERROR")
    error = fails(channel_for(fake))
    assert (error.error_class, error.code) == (ErrorClass.PERMANENT, "THIRD_PARTY_AUTH_ERROR")
    assert fake.token_requests == 1


@pytest.mark.parametrize(
    ("status", "error_code", "kind", "code"),
    [
        (400, "INVALID_ARGUMENT", PermanentError, "INVALID_ARGUMENT"),
        (403, "SENDER_ID_MISMATCH", PermanentError, "SENDER_ID_MISMATCH"),
        (404, "UNREGISTERED", PermanentError, "UNREGISTERED"),
        (500, "INTERNAL", TransientError, "INTERNAL"),
        (503, "UNAVAILABLE", TransientError, "UNAVAILABLE"),
        (502, None, TransientError, "HTTP_502"),  # Google's HTML error page
        (403, None, PermanentError, "PERMISSION_DENIED"),
    ],
)
def test_scripted_errors_are_classified(
    fake: FakeFcm, channel_for: Factory, status: int, error_code: str | None,
    kind: type[DeliveryError], code: str,
) -> None:
    fake.script(status=status, error_code=error_code)
    error = fails(channel_for(fake))
    assert type(error) is kind
    assert error.code == code


@pytest.mark.parametrize(("status", "error_code"), [(429, "QUOTA_EXCEEDED"), (503, "UNAVAILABLE")])
def test_retry_after_is_carried_to_the_caller(
    fake: FakeFcm, channel_for: Factory, status: int, error_code: str
) -> None:
    fake.script(status=status, error_code=error_code, retry_after="42")
    error = fails(channel_for(fake))
    assert isinstance(error, TransientError)
    assert error.retry_after == 42.0


def test_an_unregistered_device_is_permanent(fake: FakeFcm, channel_for: Factory) -> None:
    fake.unregister("tok-gone")
    error = fails(channel_for(fake), outgoing("tok-gone"))
    assert isinstance(error, PermanentError)
    assert error.code == "UNREGISTERED"  # the caller drops this token


def test_a_body_fcm_rejects_is_permanent(fake: FakeFcm, channel_for: Factory) -> None:
    error = fails(channel_for(fake), outgoing(data={"google.sent_time": "1"}))  # reserved key
    assert (error.error_class, error.code) == (ErrorClass.PERMANENT, "INVALID_ARGUMENT")


def test_a_wrong_project_is_an_account_failure(fake: FakeFcm, channel_for: Factory) -> None:
    error = fails(channel_for(fake, project_id="someone-else"))
    assert (error.error_class, error.code) == (ErrorClass.ACCOUNT, "NOT_FOUND")


@pytest.mark.parametrize(
    ("fault", "error_class", "code"),
    [
        ({"status": 400}, ErrorClass.ACCOUNT, "OAUTH_HTTP_400"),
        ({"status": 503}, ErrorClass.TRANSIENT, "OAUTH_HTTP_503"),
        ({"drop": True}, ErrorClass.TRANSIENT, "OAUTH_PROTOCOL"),
    ],
)
def test_token_endpoint_failures(
    fake: FakeFcm, channel_for: Factory, fault: dict[str, Any], error_class: ErrorClass,
    code: str,
) -> None:
    fake.script(target="token", **fault)
    error = fails(channel_for(fake))
    assert (error.error_class, error.code) == (error_class, code)
    assert fake.send_requests == 0


def test_a_key_the_token_endpoint_does_not_trust_is_an_account_failure(
    fake: FakeFcm, channel_for: Factory, tmp_path: Path
) -> None:
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key_file = tmp_path / "other.json"
    write_service_account(key_file, fake.expected_token_uri, key=stranger,
                          client_email=fake.client_email)
    error = fails(channel_for(fake, key_file=key_file))
    assert error.error_class is ErrorClass.ACCOUNT
    assert "Invalid JWT Signature" in error.message


def test_an_unreadable_key_file_is_an_account_failure(
    fake: FakeFcm, channel_for: Factory, tmp_path: Path
) -> None:
    error = fails(channel_for(fake, key_file=tmp_path / "missing.json"))
    assert (error.error_class, error.code) == (ErrorClass.ACCOUNT, "CREDENTIALS")
    (tmp_path / "broken.json").write_text('{"client_email": "x", "private_key": "-----BEGIN')
    error = fails(channel_for(fake, key_file=tmp_path / "broken.json"))
    assert "BEGIN" not in str(error)


def test_a_key_file_that_is_not_utf8_is_an_account_failure(
    fake: FakeFcm, channel_for: Factory, tmp_path: Path
) -> None:
    key_file = tmp_path / "sa.json"
    key_file.write_bytes(b'\xff\xfe{"client_email": "x"}')
    error = fails(channel_for(fake, key_file=key_file))
    assert (error.error_class, error.code) == (ErrorClass.ACCOUNT, "CREDENTIALS")
    assert "not UTF-8" in error.message


def test_fcm_down_is_transient(fake: FakeFcm, channel_for: Factory) -> None:
    error = fails(channel_for(fake, endpoint=f"http://127.0.0.1:{free_port()}"))
    assert isinstance(error, TransientError)
    assert error.code == "NETWORK"
    # Not chained either: httpx's exception holds the request and its Authorization header.
    assert error.__cause__ is None and error.__context__ is None


def test_a_hung_fcm_times_out_as_maybe_sent(fake: FakeFcm, channel_for: Factory) -> None:
    # Was "times out as transient" (review 3, finding 4): the read timeout came after the
    # request was written whole; FCM may have taken it (the fake does, after its hang), so it
    # is maybe sent, not a plain transient that claims nothing went out.
    fake.script(hang=5.0)
    started = time.monotonic()
    error = fails(channel_for(fake, timeout=0.5))
    assert isinstance(error, MaybeSentError)
    assert error.code == "TIMEOUT"
    assert time.monotonic() - started < 4.0


def test_fcm_accepting_but_answering_too_late_is_maybe_sent(
    fake: FakeFcm, channel_for: Factory
) -> None:
    fake.script(hang=1.0)  # stall, then accept as usual
    error = fails(channel_for(fake, timeout=0.5))
    time.sleep(1.2)
    assert len(fake.messages) == 1  # it went out
    assert (error.error_class, error.code) == (ErrorClass.MAYBE_SENT, "TIMEOUT")


def test_a_hung_token_endpoint_is_transient(
    fake: FakeFcm, channel_for: Factory, tmp_path: Path
) -> None:
    # The token request is not the push: nothing can have gone out.
    key_file = tmp_path / "sa.json"
    fake.write_service_account(key_file)
    trickler = _TricklingSend()  # token_uri -> a peer that never answers a token
    try:
        data = json.loads(key_file.read_text())
        data["token_uri"] = f"http://127.0.0.1:{trickler.port}/token"
        key_file.write_text(json.dumps(data))
        error = fails(channel_for(fake, key_file=key_file, timeout=0.5))
        assert (error.error_class, error.code) == (ErrorClass.TRANSIENT, "TIMEOUT")
        assert fake.messages == []
    finally:
        trickler.close()


class _TricklingSend:
    """messages:send that answers 200 but dribbles the body out a byte every 0.3 s: each read
    is well within httpx's timeout, the whole answer takes ~14 s."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn, contextlib.suppress(OSError):
                conn.settimeout(5)
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, _, rest = data.partition(b"\r\n\r\n")
                length = int(next(ln.split(b":")[1] for ln in head.split(b"\r\n")
                                  if ln.lower().startswith(b"content-length")))
                while len(rest) < length:
                    rest += conn.recv(65536)
                body = b'{"name": "projects/demo/messages/0:1%trickle"}'
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
                for byte in body:
                    if self.stop.is_set():
                        return
                    conn.sendall(bytes([byte]))
                    time.sleep(0.3)

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


def test_a_dribbling_fcm_cannot_hold_a_worker_past_the_send_s_deadline(
    fake: FakeFcm, channel_for: Factory, tmp_path: Path
) -> None:
    """Review 3: httpx bounds each read, not a request; a whole send is bounded by timeout x 4
    (token from the fake, messages:send from the trickler)."""
    key_file = tmp_path / "sa.json"
    fake.write_service_account(key_file)
    trickler = _TricklingSend()
    try:
        channel = channel_for(fake, key_file=key_file, timeout=0.5,
                              endpoint=f"http://127.0.0.1:{trickler.port}")
        started = time.monotonic()
        error = fails(channel)
        assert time.monotonic() - started < 4 * 0.5 + 1.0
        # The answer was on its way: FCM took the push (maybe sent since finding 4).
        assert (error.error_class, error.code) == (ErrorClass.MAYBE_SENT, "TIMEOUT")
    finally:
        trickler.close()


def test_secrets_never_reach_errors_or_reprs(
    fake: FakeFcm, channel_for: Factory, tmp_path: Path
) -> None:
    channel = channel_for(fake)
    send(channel)
    fake.script(status=401)
    fake.script(status=401)
    errors = [fails(channel)]
    fake.script(status=404, error_code="UNREGISTERED")
    errors.append(fails(channel))
    key = json.loads((tmp_path / "service-account.json").read_text())["private_key"]
    key_body = key.splitlines()[1]
    tokens = list(fake._tokens)
    assert tokens
    for text in [repr(channel), *(f"{e!s} {e!r} {e.message}" for e in errors)]:
        assert key_body not in text
        assert all(token not in text for token in tokens)


def test_the_standalone_fake_writes_its_key_and_is_scripted_over_http(
    channel_for: Factory, tmp_path: Path
) -> None:
    port, key_file = free_port(), tmp_path / "standalone-sa.json"
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.fcm", "--port", str(port), "--key-file",
         str(key_file)],
        cwd=Path(__file__).resolve().parents[2], env=clean_env(),
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        assert process.stdout is not None
        assert "fake fcm on" in process.stdout.readline()  # printed once it is serving
        api = f"http://127.0.0.1:{port}/_fake"
        httpx.post(f"{api}/script", json={"status": 404, "error_code": "UNREGISTERED"})
        standalone = FakeFcm(port=port)  # only describes the server for channel_for
        channel = channel_for(standalone, key_file=key_file)
        assert fails(channel).code == "UNREGISTERED"
        send(channel)
        assert httpx.get(f"{api}/messages").json()[0]["message"]["token"] == "tok-alice"
        assert httpx.get(f"{api}/stats").json() == {"token_requests": 1, "send_requests": 2}
        httpx.post(f"{api}/reset")
        assert httpx.get(f"{api}/messages").json() == []
    finally:
        process.terminate()
        process.wait(timeout=10)
        assert process.stdout is not None
        process.stdout.close()


@pytest.mark.parametrize("body", [
    "<html><body>Please log in to the guest network</body></html>",  # a captive portal
    {},  # a proxy's empty JSON
    {"name": ""},
])
def test_a_2xx_without_a_message_name_is_not_counted_as_sent(
    fake: FakeFcm, channel_for: Factory, body: Any
) -> None:
    # FCM answers every accepted push with its message name (PROTOCOLS.md). A 2xx without one
    # came from something in between: the push may or may not have reached FCM. Counted as
    # sent, the alert was closed although no phone may ever show it.
    fake.script(status=200, body=body)
    error = fails(channel_for(fake))
    assert (error.error_class, error.code) == (ErrorClass.MAYBE_SENT, "INVALID_RESPONSE")
    assert fake.messages == []
