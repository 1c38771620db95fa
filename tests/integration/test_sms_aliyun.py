"""AliyunSms through the real Dysmsapi SDK against the signature-checking fake."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import subprocess
import sys
import time
import traceback
import urllib.request
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import redis
from celery.exceptions import SoftTimeLimitExceeded

from notifier.api.views import transaction_view
from notifier.channels.aliyun_errors import TABLE
from notifier.channels.base import ChannelContext
from notifier.channels.sms_aliyun import CHINA_TZ, AliyunSms, send_dates
from notifier.config import AliyunSmsProvider
from notifier.errors import (
    ConfigError,
    MaybeSentError,
    PermanentError,
    TransientError,
)
from notifier.models import ErrorClass, Event, Outgoing, Rendered, Source
from tests.fakes.dysmsapi import FakeDysmsapi
from tests.integration.conftest import SMS_ENV, MakeFleet
from tests.integration.test_pipeline import FAST_RETRY, aliyun, config, outbox
from tests.support.channel_calls import send_error, send_now
from tests.support.servers import clean_env, free_port
from tests.support.tls import CorruptingTlsFront

AK_ID, AK_SECRET = "LTAI5tFakeKeyId0001", "s3cr3t-VALUE-never-printed"
TEMPLATES = {"alert": "SMS_100001", "resolved": "SMS_100002", "drill": "SMS_100003"}


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeDysmsapi]:
    with FakeDysmsapi(AK_ID, AK_SECRET) as server:
        yield server


@pytest.fixture(autouse=True)
def _clean(fake: FakeDysmsapi) -> None:
    fake.reset()


def make_channel(endpoint: str, secret: str = AK_SECRET, **overrides: Any) -> AliyunSms:
    config = AliyunSmsProvider.model_validate({
        "provider": "aliyun", "endpoint": endpoint, "protocol": "http", "sign_name": "运维告警",
        "templates": TEMPLATES, "connect_timeout": 0.5, "read_timeout": 0.5, **overrides,
    })
    # The SMS channel never touches Redis; the client object connects lazily and is unused.
    context = ChannelContext(
        redis=redis.Redis(port=1),
        env={"ALIBABA_CLOUD_ACCESS_KEY_ID": AK_ID, "ALIBABA_CLOUD_ACCESS_KEY_SECRET": secret},
    )
    return AliyunSms(config, context)


@pytest.fixture
def channel(fake: FakeDysmsapi) -> AliyunSms:
    return make_channel(fake.endpoint)


def outgoing(delivery_id: str = "dlv-1", address: str = "+8613800138000", kind: str = "alert",
             **params: str) -> Outgoing:
    return Outgoing(delivery_id=delivery_id, transaction_id="tx-1", address=address, kind=kind,
                    rendered=Rendered(params=params or {"title": "DiskFull db-1"}))


def test_send_puts_the_right_parameters_on_the_wire(fake: FakeDysmsapi, channel: AliyunSms) -> None:
    params = {"title": "磁盘满 db-1", "value": "97% & +5 = ~x"}  # needs careful URL-encoding
    message = Outgoing(delivery_id="dlv-42", transaction_id="tx-9", address="+8613800138000",
                       kind="resolved", rendered=Rendered(params=params),
                       data={"sms_up_extend_code": "0427"})
    receipt = send_now(channel, message)

    [record] = fake.messages
    assert record["phone_numbers"] == "13800138000"  # mainland: bare 11 digits
    assert record["sign_name"] == "运维告警"
    assert record["template_code"] == "SMS_100002"
    assert record["template_param"] == params
    assert record["template_param_raw"] == json.dumps(params, ensure_ascii=False)
    assert record["out_id"] == "dlv-42"
    assert record["sms_up_extend_code"] == "0427"
    assert record["access_key_id"] == AK_ID
    assert receipt.provider_message_id == record["biz_id"]
    assert receipt.provider_message_id.endswith("^0")  # BizId looks like 900619746936498440^0
    assert receipt.request_id == record["request_id"]


def test_international_number_goes_out_as_country_code_and_number(
    fake: FakeDysmsapi, channel: AliyunSms
) -> None:
    send_now(channel, outgoing(address="+85251234567"))
    assert fake.messages[0]["phone_numbers"] == "85251234567"


def test_kind_without_template_falls_back_to_alert(fake: FakeDysmsapi, channel: AliyunSms) -> None:
    send_now(channel, outgoing(kind="digest"))
    assert fake.messages[0]["template_code"] == "SMS_100001"


def test_no_template_at_all_is_permanent_and_sends_nothing(fake: FakeDysmsapi) -> None:
    # The config refuses templates without 'alert'; the channel still refuses to guess one.
    channel = make_channel(fake.endpoint)
    channel.config = channel.config.model_copy(update={"templates": {"drill": "SMS_100003"}})
    error = send_error(channel, outgoing(kind="alert"))
    assert isinstance(error, PermanentError) and error.code == "NoTemplate"
    assert fake.requests.total() == 0


@pytest.mark.parametrize(("secret", "key_id", "code"), [
    ("wrong-secret", AK_ID, "SignatureDoesNotMatch"),
    (AK_SECRET, "LTAI5tUnknownKeyId", "InvalidAccessKeyId.NotFound"),
])
def test_bad_credentials_are_an_account_error_that_never_shows_the_secret(
    fake: FakeDysmsapi, secret: str, key_id: str, code: str
) -> None:
    channel = make_channel(fake.endpoint, secret=secret)
    channel = AliyunSms(channel.config, ChannelContext(redis=redis.Redis(port=1), env={
        "ALIBABA_CLOUD_ACCESS_KEY_ID": key_id, "ALIBABA_CLOUD_ACCESS_KEY_SECRET": secret}))
    error = send_error(channel, outgoing())
    assert isinstance(error, PermanentError)
    assert (error.error_class, error.code) == (ErrorClass.ACCOUNT, code)
    assert error.trips_breaker
    text = "".join(traceback.format_exception(error)) + repr(error) + repr(channel)
    assert secret not in text and AK_SECRET not in text
    assert fake.messages == []


def test_missing_key_env_is_a_config_error_naming_the_variable(fake: FakeDysmsapi) -> None:
    config = make_channel(fake.endpoint).config
    with pytest.raises(ConfigError, match="ALIBABA_CLOUD_ACCESS_KEY_SECRET") as info:
        AliyunSms(config, ChannelContext(redis=redis.Redis(port=1),
                                         env={"ALIBABA_CLOUD_ACCESS_KEY_ID": AK_ID}))
    assert AK_ID not in str(info.value)


LIMIT = {"kind": "business", "code": "isv.BUSINESS_LIMIT_CONTROL"}


@pytest.mark.parametrize(("behaviour", "error_class", "code", "retry_after"), [
    ({**LIMIT, "message": "触发分钟级流控Permits:1"},
     ErrorClass.TRANSIENT, "isv.BUSINESS_LIMIT_CONTROL", 60.0),
    ({**LIMIT, "message": "触发小时级流控Permits:5"},
     ErrorClass.RECIPIENT_BUDGET, "isv.BUSINESS_LIMIT_CONTROL", None),
    ({**LIMIT, "message": "触发天级流控Permits:10"},
     ErrorClass.RECIPIENT_BUDGET, "isv.BUSINESS_LIMIT_CONTROL", None),
    ({"kind": "gateway", "status": 400, "code": "Throttling.User", "retry_after": 3000},
     ErrorClass.TRANSIENT, "Throttling.User", 3.0),
    ({"kind": "gateway", "status": 400, "code": "Throttling.Api"},
     ErrorClass.TRANSIENT, "Throttling.Api", None),
    ({"kind": "gateway", "status": 503, "code": "ServiceUnavailable"},
     ErrorClass.TRANSIENT, "ServiceUnavailable", None),
    ({"kind": "gateway", "status": 500, "code": "InternalError"},
     ErrorClass.TRANSIENT, "InternalError", None),
    ({"kind": "gateway", "status": 502, "code": "Gateway.Unknown"},
     ErrorClass.TRANSIENT, "Gateway.Unknown", None),
    ({"kind": "gateway", "status": 400, "code": "InvalidTimeStamp.Expired"},
     ErrorClass.ACCOUNT, "InvalidTimeStamp.Expired", None),
    ({"kind": "non_json", "status": 502},
     ErrorClass.MAYBE_SENT, "InvalidResponse", None),
    ({"kind": "gateway", "status": 403, "code": "Forbidden.RAM"},
     ErrorClass.ACCOUNT, "Forbidden.RAM", None),
    ({"kind": "gateway", "status": 403, "code": "NoPermission"},
     ErrorClass.ACCOUNT, "NoPermission", None),
    ({"kind": "gateway", "status": 400, "code": "MissingPhoneNumbers"},
     ErrorClass.PERMANENT, "MissingPhoneNumbers", None),
])
def test_scripted_failures_are_classified(
    fake: FakeDysmsapi, channel: AliyunSms, behaviour: dict[str, Any],
    error_class: ErrorClass, code: str, retry_after: float | None,
) -> None:
    fake.script(behaviour)
    error = send_error(channel, outgoing())
    assert (error.error_class, error.code, error.retry_after) == (error_class, code, retry_after)
    assert fake.messages == []


def test_every_business_code_of_the_table_classifies_as_the_table_says(
    fake: FakeDysmsapi, channel: AliyunSms
) -> None:
    fake.script(*({"kind": "business", "code": code, "message": "x"} for code in TABLE))
    for code, expected in TABLE.items():
        error = send_error(channel, outgoing())
        assert (error.code, error.error_class) == (code, expected)


def test_fake_validation_reaches_the_table(fake: FakeDysmsapi, channel: AliyunSms) -> None:
    error = send_error(channel, outgoing(title="x" * 36))  # longer than a variable may be
    assert (error.code, error.error_class) == ("isv.PARAM_LENGTH_LIMIT", ErrorClass.PERMANENT)


def test_read_timeout_after_send_is_maybe_sent_and_lookup_finds_it(
    fake: FakeDysmsapi, channel: AliyunSms
) -> None:
    sent_after = time.time()
    fake.script({"kind": "stall", "seconds": 2})
    message = outgoing(delivery_id="dlv-stalled")
    error = send_error(channel, message)
    assert isinstance(error, MaybeSentError) and error.code == "ReadTimeout"
    assert [m["out_id"] for m in fake.messages] == ["dlv-stalled"]  # it did go out

    found = asyncio.run(channel.lookup(message, sent_after))
    assert found is not None
    assert found.detail["OutId"] == "dlv-stalled" and found.detail["SendStatus"] == "3"


def test_soft_time_limit_mid_request_goes_up_and_the_next_send_is_clean(
    fake: FakeDysmsapi, channel: AliyunSms, soft_limit_in: Callable[[float], Any]
) -> None:
    # The SDK call runs on the worker's own thread, so Celery's soft time limit (a signal whose
    # handler raises SoftTimeLimitExceeded) lands inside the request itself, as here.
    fake.script({"kind": "stall", "seconds": 0.4})  # below the 0.5 s read timeout
    soft_limit_in(0.15)
    # Not classified here: the pipeline records whatever a send raises that is not a
    # DeliveryError as maybe sent (the request had left: look it up, never resend).
    with pytest.raises(SoftTimeLimitExceeded):
        send_now(channel, outgoing(delivery_id="dlv-interrupted"))
    # The pooled keep-alive connection was cut mid-answer: the next request must not read the
    # stalled answer as its own.
    receipt = send_now(channel, outgoing(delivery_id="dlv-next"))
    assert [m["out_id"] for m in fake.messages] == ["dlv-interrupted", "dlv-next"]
    assert receipt.provider_message_id == fake.messages[1]["biz_id"]


def test_soft_time_limit_mid_lookup_ends_the_step_instead_of_reading_as_not_found(
    fake: FakeDysmsapi, channel: AliyunSms, soft_limit_in: Callable[[float], Any]
) -> None:
    # A look-up that fails reads "not found" and the SMS is sent again (a possible duplicate
    # beats a lost alert). The soft time limit is not such a failure: the step is out of time,
    # and a fresh SendSms in the seconds before the hard kill is the one that could go out
    # twice. It must end the step; the delivery's next claim looks it up again.
    fake.script({"kind": "stall", "seconds": 0.4, "action": "QuerySendDetails"})
    soft_limit_in(0.15)
    with pytest.raises(SoftTimeLimitExceeded):
        asyncio.run(channel.lookup(outgoing(delivery_id="dlv-looked-up"), time.time() - 60))


def test_hang_is_maybe_sent_and_lookup_then_finds_nothing(
    fake: FakeDysmsapi, channel: AliyunSms
) -> None:
    # The request left and no answer came: from here a hang and a stall are the same thing,
    # so it must be MaybeSent; the lookup is what tells them apart.
    sent_after = time.time()
    fake.script({"kind": "hang", "seconds": 2})
    message = outgoing(delivery_id="dlv-hung")
    assert isinstance(send_error(channel, message), MaybeSentError)
    assert asyncio.run(channel.lookup(message, sent_after)) is None


def test_lookup_pages_through_a_busy_number(fake: FakeDysmsapi, channel: AliyunSms) -> None:
    sent_after = time.time()

    async def send_many() -> None:
        for i in range(60):
            await channel.send(outgoing(delivery_id=f"dlv-{i}"))

    asyncio.run(send_many())
    first = asyncio.run(channel.lookup(outgoing(delivery_id="dlv-0"), sent_after))
    assert first is not None and first.detail["OutId"] == "dlv-0"
    assert fake.requests["QuerySendDetails"] == 2  # newest first: dlv-0 sits on page 2


def test_lookup_that_cannot_ask_says_not_found_but_query_status_raises(
    fake: FakeDysmsapi, channel: AliyunSms
) -> None:
    # e.g. a RAM policy that allows SendSms only: the pipeline must still be able to resend
    denied = {"kind": "business", "code": "isp.RAM_PERMISSION_DENY",
              "action": "QuerySendDetails", "times": 2}
    fake.script(denied)
    assert asyncio.run(channel.lookup(outgoing(), time.time())) is None
    with pytest.raises(PermanentError) as info:
        asyncio.run(channel.query_status("+8613800138000", "20261123"))
    assert info.value.error_class is ErrorClass.ACCOUNT


def test_a_failed_lookup_is_logged_with_its_transaction(
    fake: FakeDysmsapi, channel: AliyunSms, caplog: pytest.LogCaptureFixture
) -> None:
    fake.script({"kind": "business", "code": "isp.RAM_PERMISSION_DENY",
                 "action": "QuerySendDetails"})
    with caplog.at_level(logging.WARNING, logger="notifier"):
        assert asyncio.run(channel.lookup(outgoing(), time.time())) is None
    (record,) = [r for r in caplog.records if "QuerySendDetails failed" in r.getMessage()]
    assert (getattr(record, "transaction_id", None), getattr(record, "delivery_id", None)) == (
        "tx-1", "dlv-1")


def test_connection_refused_is_transient() -> None:
    channel = make_channel(f"127.0.0.1:{free_port()}")
    error = send_error(channel, outgoing())
    assert isinstance(error, TransientError) and error.code == "ConnectionError"


def test_scripted_refusal_then_recovery(fake: FakeDysmsapi, channel: AliyunSms) -> None:
    fake.script({"kind": "refuse", "seconds": 0.5})
    assert isinstance(send_error(channel, outgoing()), TransientError)
    time.sleep(0.7)
    send_now(channel, outgoing())
    assert len(fake.messages) == 1


def test_connect_timeout_is_transient() -> None:
    # A listener whose accept queue is full drops new SYNs: a real connect timeout on loopback.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        fillers = [socket.socket() for _ in range(4)]
        try:
            for sock in fillers:
                sock.setblocking(False)
                sock.connect_ex(listener.getsockname())
            time.sleep(0.1)
            channel = make_channel(f"127.0.0.1:{listener.getsockname()[1]}")
            error = send_error(channel, outgoing())
        finally:
            for sock in fillers:
                sock.close()
    assert isinstance(error, TransientError) and error.code == "ConnectTimeout"


def test_query_status_reports_the_delivery_outcome(fake: FakeDysmsapi, channel: AliyunSms) -> None:
    fake.script({"kind": "ok", "send_status": 2, "err_code": "IC:0001"})
    failed = send_now(channel, outgoing(delivery_id="dlv-failed"))
    delivered = send_now(channel, outgoing(delivery_id="dlv-ok"))
    today = datetime.now(CHINA_TZ).date()

    phone = "+8613800138000"
    [record] = asyncio.run(channel.query_status(phone, today, failed.provider_message_id))
    assert (record["SendStatus"], record["ErrCode"], record["OutId"]) == (2, "IC:0001",
                                                                        "dlv-failed")
    records = asyncio.run(channel.query_status(phone, today.strftime("%Y%m%d")))
    assert {r["OutId"]: r["ErrCode"] for r in records} == {
        "dlv-failed": "IC:0001", "dlv-ok": "DELIVERED"}
    assert records[0]["ReceiveDate"] and delivered.provider_message_id


def test_send_dates_cover_midnight_in_beijing() -> None:
    before_midnight = datetime(2026, 11, 23, 23, 59, 30, tzinfo=CHINA_TZ).timestamp()
    assert send_dates(before_midnight, now=before_midnight + 10) == ["20261123"]
    assert send_dates(before_midnight, now=before_midnight + 60) == ["20261123", "20261124"]


def test_standalone_fake_with_control_api() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.dysmsapi", "--port", "0",
         "--access-key-id", AK_ID, "--access-key-secret", AK_SECRET],
        stdout=subprocess.PIPE, text=True, env=clean_env(),
    )
    try:
        assert process.stdout is not None
        url = json.loads(process.stdout.readline())["url"]

        def control(path: str, body: Any = None) -> Any:
            data = None if body is None else json.dumps(body).encode()
            request = urllib.request.Request(url + path, data=data)
            with urllib.request.urlopen(request, timeout=5) as answer:
                return json.load(answer)

        assert control("/_fake/script", [{"kind": "business", "code": "isv.OUT_OF_SERVICE"}]) == {
            "queued": 1}
        channel = make_channel(url.removeprefix("http://"))
        assert send_error(channel, outgoing()).error_class is ErrorClass.ACCOUNT
        send_now(channel, outgoing(delivery_id="dlv-e2e"))
        assert [m["out_id"] for m in control("/_fake/messages")] == ["dlv-e2e"]
        assert control("/_fake/stats")["requests"] == {"SendSms": 2}
        control("/_fake/reset", {})
        assert control("/_fake/messages") == []
    finally:
        process.terminate()
        process.wait(10)
        if process.stdout is not None:
            process.stdout.close()
    assert process.returncode == 0


def test_an_account_refused_by_its_ram_policy_hands_the_alert_to_the_backup_account(
    make_fleet: MakeFleet, sms_fake: FakeDysmsapi
) -> None:
    """The gateway answers 403 Forbidden.RAM when the AccessKey's RAM user may not call
    SendSms (a policy changed, a key rotated to the wrong user): no SMS goes out on this
    account until someone fixes it. It was taken for this message's fault (an unknown 4xx,
    permanent), so the channel's backup account was skipped: the alert went by email, and on
    a route without a fallback it failed, while the backup account would have sent it."""
    forbidden = {"kind": "gateway", "status": 403, "code": "Forbidden.RAM",
                 "message": "User not authorized to operate on the specified resource, or "
                            "this API doesn't support RAM."}
    sms_fake.script(forbidden)
    sms = {**aliyun(sms_fake), "recipient_limits": [], "retry": FAST_RETRY,
           "providers": [{"provider": "sandbox", "name": "backup"}]}
    fleet = make_fleet({
        "channels": {"sms": sms, "email": {"provider": "sandbox"}},
        "recipients": {"alice": {"phone": "+8613800138000", "email": "alice@example.com"}},
        "routes": [{"match": {}, "to": ["alice"], "channels": ["sms"], "fallback": ["email"]}],
    }, SMS_ENV)
    txid = fleet.intake.submit(Event(kind="alert", title="DiskFull", severity="critical"),
                               Source.API).transaction_id
    fleet.drain(timers_until=3)
    deliveries = fleet.deps.ledger.deliveries(txid)
    assert [(d.channel, d.status) for d in deliveries] == [("sms", "sent")]
    attempts = [(a["provider"], a["outcome"]) for a in fleet.deps.ledger.attempts(deliveries[0].id)]
    assert attempts == [("aliyun", "account"), ("backup", "sent")], attempts
    assert len(outbox(fleet, "sms")) == 1 and outbox(fleet, "email") == []
    breaker = fleet.deps.breaker_for("sms:aliyun", fleet.settings.channels["sms"].breaker)
    assert breaker.status().failures == 1  # counted: the account, not the message


def test_a_tls_failure_reading_the_answer_is_looked_up_not_sent_twice(
    make_fleet: MakeFleet, sms_fake: FakeDysmsapi, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Over HTTPS, Aliyun took the SendSms and the TLS layer broke while its answer came back
    (a record that fails to decrypt: requests raises SSLError). That was filed with the
    handshake failures as 'never left', transient, so the retry sent the SMS again without a
    look-up: the phone got the page twice. It may have been sent: QuerySendDetails finds it."""
    front = CorruptingTlsFront(sms_fake.port, tmp_path, corrupt=1)
    monkeypatch.setenv("SSL_CERT_FILE", str(front.cert))  # the test CA, as a deployment's own
    sms = {**aliyun(sms_fake), "endpoint": f"127.0.0.1:{front.port}", "protocol": "https",
           "recipient_limits": [], "retry": FAST_RETRY}
    fleet = make_fleet({
        "channels": {"sms": sms},
        "recipients": {"alice": {"phone": "+8613800138000"}},
        "routes": [{"match": {}, "to": ["alice"], "channels": ["sms"]}],
    }, SMS_ENV)
    txid = fleet.intake.submit(Event(kind="alert", title="DiskFull", severity="critical"),
                               Source.API).transaction_id
    fleet.drain(timers_until=3)
    front.close()
    (delivery,) = fleet.deps.ledger.deliveries(txid)
    attempts = [a["outcome"] for a in fleet.deps.ledger.attempts(delivery.id)]
    assert [m["out_id"] for m in sms_fake.messages] == [delivery.id], attempts
    assert attempts == ["maybe_sent", "found_after_timeout"], attempts
    assert delivery.status == "sent"


def test_a_send_found_by_look_up_is_tracked_at_the_provider_s_send_time(
    make_fleet: MakeFleet, sms_fake: FakeDysmsapi
) -> None:
    # The answer to SendSms is lost (a stall past the read timeout), the look-up after the
    # backoff finds it. The tracking API must say when Aliyun took the SMS (its SendDate), not
    # when we happened to ask: a drill measures "provider accepted" from it, and the receipt
    # reconciler picks the days to query from it.
    sms_fake.script({"kind": "stall", "seconds": 1})
    slow_retry = {**FAST_RETRY, "base_delay": "1500ms", "max_delay": "1500ms"}
    fleet = make_fleet(config(aliyun(sms_fake), retry=slow_retry), SMS_ENV)
    txid = fleet.intake.submit(Event(kind="alert", title="DiskFull", severity="critical"),
                               Source.API).transaction_id
    fleet.drain(timers_until=4)
    [delivery] = transaction_view(fleet.deps.ledger, txid)["deliveries"]  # type: ignore[index]
    assert [a["outcome"] for a in delivery["attempts"]] == ["maybe_sent", "found_after_timeout"]
    [record] = sms_fake.messages
    provider_sent = datetime.strptime(record["send_date"], "%Y-%m-%d %H:%M:%S").replace(
        tzinfo=CHINA_TZ).timestamp()
    assert delivery["sent_at"] == provider_sent


# The console templates of templates/sms/alert.*.j2: the words outside ${...} are Aliyun's.
ALERT_CONSOLE = {"zh-CN": "告警（${severity}）：${title}，${content}",
                 "en": "[${severity}] ${title}: ${content}"}


@pytest.mark.parametrize(("locale", "resolved_word"), [("zh-CN", "已恢复"), ("en", "RESOLVED")])
def test_a_resolved_alert_sent_with_the_alert_template_reads_as_resolved(
    make_fleet: MakeFleet, locale: str, resolved_word: str
) -> None:
    # An account with only the 'alert' TemplateCode sends a resolved alert with it. The phone
    # shows the alert console template filled with the variables: they alone must say it is
    # over, or the on-call reads "DiskFull" at 3 am as a new firing.
    with FakeDysmsapi(*SMS_ENV.values(), templates={"SMS_1": ALERT_CONSOLE[locale]}) as fake:
        cfg = config(aliyun(fake))
        cfg["recipients"]["alice"]["locale"] = locale
        fleet = make_fleet(cfg, SMS_ENV)
        for kind in ("alert", "resolved"):
            fleet.intake.submit(Event(kind=kind, title="DiskFull db-1", severity="critical",
                                      body="disk 97%"), Source.API)
            fleet.drain()
        firing, resolved = (m["content"] for m in fake.messages)
    assert resolved_word not in firing
    assert resolved_word in resolved
