"""SmtpEmail against a real SMTP server (aiosmtpd) on loopback: what a recipient gets, and
how every failure a mail server can produce is classified."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from notifier.breaker import BreakerState
from notifier.channels.base import ChannelContext
from notifier.channels.email_smtp import SmtpEmail
from notifier.config import SmtpProvider
from notifier.errors import DeliveryError, MaybeSentError, PermanentError, TransientError
from notifier.models import ErrorClass, Event, Outgoing, Receipt, Rendered, Source
from tests.fakes.smtp import FakeSmtp
from tests.integration.conftest import MakeFleet
from tests.support.channel_calls import send_error, send_now
from tests.support.servers import clean_env, free_port
from tests.support.tcp_relay import SlowReplies

PASSWORD = "hunter2-not-in-logs"
SUBJECT = "【严重】磁盘告警 DiskFull on db-1"

Factory = Callable[..., SmtpEmail]


def outgoing(delivery_id: str = "dlv-1", html: str | None = "<p>磁盘 <b>97%</b></p>",
             **kw: Any) -> Outgoing:
    fields: dict[str, Any] = {
        "delivery_id": delivery_id,
        "transaction_id": "tx-0001",
        "address": "alice@example.com",
        "kind": "alert",
        "rendered": Rendered(subject=SUBJECT, text="磁盘 /data 使用率 97%", html=html),
    }
    fields.update(kw)
    return Outgoing(**fields)


def send(channel: SmtpEmail, message: Outgoing | None = None) -> Receipt:
    return send_now(channel, message or outgoing())


def fails(channel: SmtpEmail, message: Outgoing | None = None) -> DeliveryError:
    return send_error(channel, message or outgoing())


@pytest.fixture
def make_fake() -> Iterator[Callable[..., FakeSmtp]]:
    started: list[FakeSmtp] = []

    def make(**kwargs: Any) -> FakeSmtp:
        fake = FakeSmtp(**kwargs)
        fake.start()
        started.append(fake)
        return fake

    yield make
    for fake in started:
        fake.stop()


@pytest.fixture
def channel_for() -> Iterator[Callable[..., SmtpEmail]]:
    client = redis.Redis(port=free_port())  # never used: email needs no Redis

    def make(fake: FakeSmtp | None, password: str = PASSWORD, **config: Any) -> SmtpEmail:
        settings: dict[str, Any] = {
            "provider": "smtp", "host": "127.0.0.1", "port": fake.port if fake else free_port(),
            "tls": fake.tls if fake else "none", "sender": "运维告警 <notifier@alerts.example.com>",
            "validate_certs": False, "timeout": 5,
        }
        if fake is not None and fake.auth is not None:
            settings["username"] = fake.auth[0]
        settings.update(config)
        env = {"NOTIFIER_SMTP_PASSWORD": password}
        return SmtpEmail(SmtpProvider(**settings), ChannelContext(redis=client, env=env))

    yield make
    client.close()


def test_a_recipient_gets_a_multipart_email_with_our_headers(
    make_fake: Callable[..., FakeSmtp], channel_for: Factory
) -> None:
    fake = make_fake()
    receipt = send(channel_for(fake))

    [mail] = fake.messages
    assert fake.envelopes == [("notifier@alerts.example.com", ["alice@example.com"])]
    assert mail.get_content_type() == "multipart/alternative"
    assert mail["Subject"] == SUBJECT  # decoded from its RFC 2047 form
    assert mail["From"].addresses[0].display_name == "运维告警"
    assert mail["To"] == "alice@example.com"
    assert mail["X-Notifier-Transaction-Id"] == "tx-0001"
    assert mail["X-Notifier-Delivery-Id"] == "dlv-1"
    assert mail["Message-ID"] == receipt.provider_message_id
    assert receipt.provider_message_id.endswith("@alerts.example.com>")
    assert abs(parsedate_to_datetime(mail["Date"]).timestamp() - time.time()) < 60
    plain = mail.get_body(preferencelist=("plain",))
    html = mail.get_body(preferencelist=("html",))
    assert plain is not None and plain.get_content().strip() == "磁盘 /data 使用率 97%"
    assert html is not None and html.get_content().strip() == "<p>磁盘 <b>97%</b></p>"


def test_the_subject_is_encoded_on_the_wire(
    make_fake: Callable[..., FakeSmtp], channel_for: Factory
) -> None:
    fake = make_fake()
    send(channel_for(fake))
    raw = fake.messages[0].as_bytes()
    assert "磁盘".encode() not in raw.split(b"\n\n", 1)[0]  # headers are 7-bit, RFC 2047
    assert b"=?utf-8?" in raw


def test_text_only_when_there_is_no_html(
    make_fake: Callable[..., FakeSmtp], channel_for: Factory
) -> None:
    fake = make_fake()
    send(channel_for(fake), outgoing(html=None))
    assert fake.messages[0].get_content_type() == "text/plain"
    assert fake.snapshot()[0]["html"] is None


def test_a_retried_delivery_keeps_its_message_id(
    make_fake: Callable[..., FakeSmtp], channel_for: Factory
) -> None:
    fake = make_fake()
    channel = channel_for(fake)
    first, again, other = send(channel), send(channel), send(channel, outgoing("dlv-2"))
    assert first.provider_message_id == again.provider_message_id
    assert other.provider_message_id != first.provider_message_id


@pytest.mark.parametrize("tls", ["none", "starttls", "tls"])
def test_each_tls_mode_delivers(
    tls: str, make_fake: Callable[..., FakeSmtp], channel_for: Factory
) -> None:
    # AUTH is only offered over TLS, as on real submission servers.
    fake = make_fake(tls=tls, auth=None if tls == "none" else ("alerts", PASSWORD))
    send(channel_for(fake))
    assert len(fake.messages) == 1
    assert fake.logins == ([] if tls == "none" else ["alerts"])


@pytest.mark.parametrize("tls", ["starttls", "tls"])
def test_certificates_are_verified_unless_told_otherwise(
    tls: str, make_fake: Callable[..., FakeSmtp], channel_for: Factory
) -> None:
    fake = make_fake(tls=tls)
    error = fails(channel_for(fake, validate_certs=True))  # the fake's cert is self-signed
    assert isinstance(error, TransientError)
    assert error.code == "TLS"
    assert fake.messages == []


def test_starttls_never_falls_back_to_plain_text(
    make_fake: Callable[..., FakeSmtp], channel_for: Factory
) -> None:
    fake = make_fake(tls="none")
    error = fails(channel_for(fake, tls="starttls"))
    assert error.error_class is ErrorClass.ACCOUNT
    assert fake.messages == []


def test_wrong_password_is_an_account_failure_that_hides_the_password(
    make_fake: Callable[..., FakeSmtp], channel_for: Factory
) -> None:
    fake = make_fake(tls="starttls", auth=("alerts", "the-right-one"))
    channel = channel_for(fake, password=PASSWORD)
    error = fails(channel)
    assert isinstance(error, PermanentError)
    assert error.error_class is ErrorClass.ACCOUNT
    assert error.code == "535"
    for text in (str(error), repr(error), error.message, repr(channel)):
        assert PASSWORD not in text
    assert fake.messages == []


def test_a_scrubbed_error_keeps_its_classification(
    make_fake: Callable[..., FakeSmtp], channel_for: Factory
) -> None:
    fake = make_fake(tls="starttls", auth=("alerts", PASSWORD))
    fake.script("rcpt", f"452 4.2.2 mailbox full (auth was {PASSWORD})")
    error = fails(channel_for(fake, password=PASSWORD))
    assert PASSWORD not in error.message
    assert (error.error_class, error.recipient_scoped, error.trips_breaker) == (
        ErrorClass.TRANSIENT, True, False)


def test_missing_credentials_where_the_server_needs_them_is_an_account_failure(
    make_fake: Callable[..., FakeSmtp], channel_for: Factory
) -> None:
    fake = make_fake(tls="starttls", auth=("alerts", PASSWORD))
    error = fails(channel_for(fake, username=None))
    assert (error.error_class, error.code) == (ErrorClass.ACCOUNT, "530")


def test_a_username_without_its_password_fails_before_connecting(
    make_fake: Callable[..., FakeSmtp], channel_for: Factory
) -> None:
    fake = make_fake(tls="starttls", auth=("alerts", PASSWORD))
    error = fails(channel_for(fake, password=""))
    assert (error.error_class, error.code) == (ErrorClass.ACCOUNT, "NO_PASSWORD")


def test_451_is_transient_and_the_retry_goes_through(
    make_fake: Callable[..., FakeSmtp], channel_for: Factory
) -> None:
    fake = make_fake()
    channel = channel_for(fake)
    fake.script("rcpt", "451 4.7.1 greylisted, try again later")
    error = fails(channel)
    assert isinstance(error, TransientError)
    assert (error.code, error.message) == ("451", "4.7.1 greylisted, try again later")
    send(channel)
    assert len(fake.messages) == 1


def smtp_channel(fake: FakeSmtp, timeout: float, max_attempts: int, **extra: Any
                 ) -> dict[str, Any]:
    """The email channel of a pipeline test: this fake, fast retries without jitter."""
    return {"provider": "smtp", "host": "127.0.0.1", "port": fake.port, "tls": "none",
            "sender": "notifier@alerts.example.com", "timeout": timeout,
            "retry": {"max_attempts": max_attempts, "base_delay": "50ms", "max_delay": "100ms",
                      "jitter": 0}, **extra}


def alice_and_bob(fake: FakeSmtp, fail_max: int) -> dict[str, Any]:
    """Alerts labelled who=alice go to alice, the rest to bob; both by email, SMS as fallback,
    on an email breaker that opens after `fail_max` failures."""
    return {
        "channels": {
            "email": smtp_channel(fake, 2, 3, breaker={"fail_max": fail_max, "reset_timeout": 30}),
            "sms": {"provider": "sandbox", "recipient_limits": []},
        },
        "recipients": {"alice": {"email": "alice@example.com", "phone": "+8613800138000"},
                       "bob": {"email": "bob@example.com", "phone": "+8613900139000"}},
        "groups": {},
        "routes": [{"match": {"who": "alice"}, "to": ["alice"], "channels": ["email"],
                    "fallback": ["sms"]},
                   {"match": {}, "to": ["bob"], "channels": ["email"], "fallback": ["sms"]}],
    }


def test_one_full_mailbox_does_not_open_the_fleet_wide_email_breaker(
    make_fake: Callable[..., FakeSmtp], make_fleet: MakeFleet
) -> None:
    """452 to RCPT, on every attempt of alice's delivery (fail_max of them): her mailbox is
    full, the mail server is fine. Her delivery falls back; bob's email still goes by email
    (review 3: the retries used to open `email:smtp` for everyone)."""
    fake = make_fake()
    fleet = make_fleet(alice_and_bob(fake, fail_max=3), {})
    fake.script("rcpt", "452 4.2.2 <alice@example.com>: mailbox full", times=10)
    fleet.intake.submit(Event(kind="alert", title="DiskFull", severity="critical",
                              labels={"who": "alice"}), Source.API)
    fleet.drain(timers_until=3)
    assert "fallen_back" in [outcome for _, outcome in fleet.outcomes]  # alice: 3 x 452
    breaker = fleet.deps.breaker_for("email:smtp", fleet.settings.channels["email"].breaker)
    assert breaker.status().state is BreakerState.CLOSED

    fake.reset()
    fleet.intake.submit(Event(kind="alert", title="DiskFull", severity="critical"), Source.API)
    fleet.drain(timers_until=1)
    assert [m["To"] for m in fake.messages] == ["bob@example.com"], fleet.outcomes


@pytest.mark.parametrize("stage", ["rcpt", "data"])
def test_550_is_permanent(
    stage: str, make_fake: Callable[..., FakeSmtp], channel_for: Factory
) -> None:
    fake = make_fake()
    fake.script(stage, "550 5.1.1 <alice@example.com>: recipient unknown")  # type: ignore[arg-type]
    error = fails(channel_for(fake))
    assert isinstance(error, PermanentError)
    assert (error.error_class, error.code) == (ErrorClass.PERMANENT, "550")


def test_a_refused_sender_is_an_account_failure(
    make_fake: Callable[..., FakeSmtp], channel_for: Factory
) -> None:
    fake = make_fake()
    fake.script("mail", "553 5.7.1 sender not allowed to relay")
    assert fails(channel_for(fake)).error_class is ErrorClass.ACCOUNT


def test_421_and_a_dropped_connection_is_transient(
    make_fake: Callable[..., FakeSmtp], channel_for: Factory
) -> None:
    fake = make_fake()
    fake.script("data", "421 4.3.2 shutting down", close=True)
    error = fails(channel_for(fake))
    assert isinstance(error, TransientError)
    assert error.code == "421"


def test_a_server_that_is_down_is_transient(channel_for: Factory) -> None:
    error = fails(channel_for(None))
    assert isinstance(error, TransientError)
    assert error.code == "CONNECT"


def test_a_server_hung_after_the_message_times_out_as_maybe_sent(
    make_fake: Callable[..., FakeSmtp], channel_for: Factory
) -> None:
    # Was "times out as transient" (review 3, finding 4): the fake hangs in its DATA handler,
    # after the whole message and its final dot arrived; a real server may have queued it by
    # then, so the timeout is maybe sent, not a plain transient that claims nothing went out.
    fake = make_fake()
    fake.script("data", "250 OK", hang=5.0)
    started = time.monotonic()
    error = fails(channel_for(fake, timeout=0.5))
    assert isinstance(error, MaybeSentError)
    assert error.code == "TIMEOUT"
    assert time.monotonic() - started < 4.0


def test_a_server_hung_before_data_times_out_as_transient(
    make_fake: Callable[..., FakeSmtp], channel_for: Factory
) -> None:
    fake = make_fake()
    fake.script("rcpt", "250 OK", hang=5.0)  # the message never left
    error = fails(channel_for(fake, timeout=0.5))
    assert isinstance(error, TransientError)
    assert error.code == "TIMEOUT"


def test_a_maybe_sent_email_is_sent_again_and_recorded_as_such(
    make_fake: Callable[..., FakeSmtp], make_fleet: MakeFleet
) -> None:
    """SMTP cannot look a message up: after a maybe-sent attempt the pipeline sends it again
    after the backoff, and the delivery's history shows the first attempt as maybe sent."""
    fake = make_fake()
    fleet = make_fleet({
        "channels": {
            "email": smtp_channel(fake, 0.5, 3),
        },
        "recipients": {"alice": {"email": "alice@example.com"}},
        "routes": [{"match": {}, "to": ["alice"], "channels": ["email"]}],
    }, {})
    fake.script("data", "250 OK", hang=3.0)
    fleet.intake.submit(Event(kind="alert", title="DiskFull", severity="critical"), Source.API)
    fleet.drain(timers_until=3)
    (did,) = {d for d, outcome in fleet.outcomes if outcome == "sent"}
    attempts = [(a["outcome"], a.get("error_code")) for a in fleet.deps.ledger.attempts(did)]
    assert attempts[0] == ("maybe_sent", "TIMEOUT"), attempts
    assert attempts[-1][0] == "sent", attempts
    assert [m["To"] for m in fake.messages] == ["alice@example.com"]


def test_an_email_maybe_sent_on_every_attempt_still_falls_back(
    make_fake: Callable[..., FakeSmtp], make_fleet: MakeFleet
) -> None:
    """No look-up for SMTP: after the last maybe-sent attempt the alert goes to the fallback
    channel at once (no look-up claim that could find nothing); it is never dropped."""
    fake = make_fake()
    fleet = make_fleet({
        "channels": {
            "email": smtp_channel(fake, 0.3, 2),
            "sms": {"provider": "sandbox", "recipient_limits": []},
        },
        "recipients": {"alice": {"email": "alice@example.com", "phone": "+8613800138000"}},
        "routes": [{"match": {}, "to": ["alice"], "channels": ["email"], "fallback": ["sms"]}],
    }, {})
    fake.script("data", "250 OK", hang=2.0, times=2)
    fleet.intake.submit(Event(kind="alert", title="DiskFull", severity="critical"), Source.API)
    fleet.drain(timers_until=3)
    (email_did,) = {d for d, outcome in fleet.outcomes if outcome == "fallen_back"}
    attempts = [a["outcome"] for a in fleet.deps.ledger.attempts(email_did)]
    assert attempts == ["maybe_sent", "maybe_sent"], attempts
    assert "looking_up" not in [outcome for _, outcome in fleet.outcomes]
    assert "sent" in [outcome for _, outcome in fleet.outcomes]  # the SMS fallback


def test_header_injection_is_refused_before_anything_is_sent(
    make_fake: Callable[..., FakeSmtp], channel_for: Factory
) -> None:
    fake = make_fake()
    error = fails(channel_for(fake), outgoing(transaction_id="tx\r\nBcc: mallory@example.com"))
    assert (error.error_class, error.code) == (ErrorClass.PERMANENT, "INVALID_MESSAGE")
    assert fake.messages == []


def test_one_channel_sends_from_successive_event_loops(
    make_fake: Callable[..., FakeSmtp], channel_for: Factory
) -> None:
    # Built outside any loop (as Celery does before forking), used from fresh loops after.
    fake = make_fake()
    channel = channel_for(fake)
    for i in range(3):
        send(channel, outgoing(f"dlv-{i}"))
    assert [m["X-Notifier-Delivery-Id"] for m in fake.messages] == ["dlv-0", "dlv-1", "dlv-2"]


def test_the_standalone_fake_is_scripted_and_read_over_http(channel_for: Factory) -> None:
    port, control = free_port(), free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.smtp", "--port", str(port),
         "--control-port", str(control)],
        cwd=Path(__file__).resolve().parents[2], env=clean_env(),
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        assert process.stdout is not None
        assert "fake smtp on" in process.stdout.readline()  # printed once it is serving
        api = f"http://127.0.0.1:{control}/_fake"
        httpx.post(f"{api}/script", json={"stage": "rcpt", "reply": "452 4.2.2 mailbox full"})
        standalone = FakeSmtp(port=port)  # only describes the server for channel_for
        assert isinstance(fails(channel_for(standalone)), TransientError)
        send(channel_for(standalone))
        [mail] = httpx.get(f"{api}/messages").json()
        assert mail["subject"] == SUBJECT
        assert mail["to"] == ["alice@example.com"]
        assert mail["headers"]["X-Notifier-Transaction-Id"] == "tx-0001"
        assert mail["html"].strip() == "<p>磁盘 <b>97%</b></p>"
        httpx.post(f"{api}/reset")
        assert httpx.get(f"{api}/messages").json() == []
    finally:
        process.terminate()
        process.wait(timeout=10)
        assert process.stdout is not None
        process.stdout.close()


def test_label_text_shaped_like_an_encoded_word_stays_text_in_the_subject(
    make_fake: Callable[..., FakeSmtp], make_fleet: MakeFleet
) -> None:
    """An alert's title is data: text in it that reads as an RFC 2047 encoded word (here one
    whose bytes are CR LF and a header) must reach the mailbox as that text, inside the
    Subject. The email package decoded it when the Subject was set, and wrote the decoded CR LF
    raw: the sender of the alert added a Reply-To of its choosing to every on-call email."""
    fake = make_fake()
    fleet = make_fleet({
        "channels": {"email": smtp_channel(fake, 2, 1)},
        "recipients": {"alice": {"email": "alice@example.com"}},
        "routes": [{"match": {}, "to": ["alice"], "channels": ["email"]}],
    }, {})
    title = "=?utf-8?q?DiskFull=0D=0AReply-To:_mallory@evil.example?="
    fleet.intake.submit(Event(kind="alert", title=title, severity="critical"), Source.API)
    fleet.drain(timers_until=1)
    [mail] = fake.messages
    assert mail["Reply-To"] is None, mail.items()
    assert title in mail["Subject"], mail["Subject"]


def test_a_message_too_big_for_the_server_does_not_open_the_fleet_wide_email_breaker(
    make_fake: Callable[..., FakeSmtp], make_fleet: MakeFleet
) -> None:
    """A server refuses a message above its SIZE with 552 to MAIL FROM (RFC 1870): that one
    message is too big, every other still goes. It was taken for our sender being refused
    (ACCOUNT) and counted against `email:smtp`: two alerts with long bodies for alice shut
    email off for everyone, and bob's small one went by SMS."""
    fake = make_fake(data_size_limit=20_000)
    fleet = make_fleet(alice_and_bob(fake, fail_max=2), {})
    for _ in range(2):
        fleet.intake.submit(Event(kind="alert", title="DiskFull", severity="critical",
                                  body="disk /data is full " * 2000, labels={"who": "alice"}),
                            Source.API)
    fleet.drain(timers_until=3)
    assert fake.messages == []
    breaker = fleet.deps.breaker_for("email:smtp", fleet.settings.channels["email"].breaker)
    assert breaker.status().state is BreakerState.CLOSED

    fleet.intake.submit(Event(kind="alert", title="DiskFull", severity="critical"), Source.API)
    fleet.drain(timers_until=1)
    assert [m["To"] for m in fake.messages] == ["bob@example.com"], fleet.outcomes


def test_an_address_with_a_non_ascii_mailbox_gets_its_email_where_the_server_takes_smtputf8(
    make_fake: Callable[..., FakeSmtp], make_fleet: MakeFleet
) -> None:
    """'运维值班@example.com' passes the config (an internationalised address, RFC 6530) and the
    server offers SMTPUTF8 (aiosmtpd does, as Postfix does by default). The To header was built with the email
    package's Address, which refuses a non-ASCII local part: every alert to that person failed
    as INVALID_MESSAGE before connecting, and went by SMS or nowhere."""
    fake = make_fake()
    fleet = make_fleet({
        "channels": {"email": smtp_channel(fake, 2, 1),
                     "sms": {"provider": "sandbox", "recipient_limits": []}},
        "recipients": {"alice": {"email": "运维值班@example.com", "phone": "+8613800138000"}},
        "routes": [{"match": {}, "to": ["alice"], "channels": ["email"], "fallback": ["sms"]}],
    }, {})
    fleet.intake.submit(Event(kind="alert", title="DiskFull", severity="critical"), Source.API)
    fleet.drain(timers_until=1)
    assert fake.envelopes == [("notifier@alerts.example.com", ["运维值班@example.com"])], \
        fleet.outcomes
    assert fake.messages[0]["To"] == "运维值班@example.com"


def test_a_server_closing_at_rcpt_with_421_opens_the_email_breaker(
    make_fake: Callable[..., FakeSmtp], make_fleet: MakeFleet
) -> None:
    """421 is the server closing the session (RFC 5321 3.8), whichever command it answers: at
    RCPT too it says nothing of the mailbox. It was taken for one mailbox's trouble, like 452,
    so a server shedding every session at RCPT never opened `email:smtp`: every alert kept
    trying it, max_attempts times with backoff, before going by SMS."""
    fake = make_fake()
    fleet = make_fleet({
        "channels": {
            "email": smtp_channel(fake, 2, 2, breaker={"fail_max": 2, "reset_timeout": 30}),
            "sms": {"provider": "sandbox", "recipient_limits": []},
        },
        "recipients": {"alice": {"email": "alice@example.com", "phone": "+8613800138000"}},
        "routes": [{"match": {}, "to": ["alice"], "channels": ["email"], "fallback": ["sms"]}],
    }, {})
    fake.script("rcpt", "421 4.3.2 service shutting down", close=True, times=10)
    fleet.intake.submit(Event(kind="alert", title="DiskFull", severity="critical"), Source.API)
    fleet.drain(timers_until=3)
    assert "fallen_back" in [outcome for _, outcome in fleet.outcomes]
    breaker = fleet.deps.breaker_for("email:smtp", fleet.settings.channels["email"].breaker)
    assert breaker.status().state is BreakerState.OPEN


def test_a_slow_server_answering_each_step_in_time_gets_its_email_once(
    make_fake: Callable[..., FakeSmtp], channel_for: Factory
) -> None:
    # Every reply comes 0.4 s late, inside the 0.5 s timeout: a loaded relay, working. The
    # whole send is six round trips (greeting, EHLO, MAIL, RCPT, DATA, the final dot); a budget
    # of fewer cuts it off after DATA, as maybe sent, and the retry mails the person twice.
    fake = make_fake()
    relay = SlowReplies(("127.0.0.1", fake.port), 0.4)
    try:
        receipt = send(channel_for(fake, port=relay.port, timeout=0.5))
    finally:
        relay.close()
    assert len(fake.messages) == 1
    assert receipt.provider_message_id == fake.messages[0]["Message-ID"]
