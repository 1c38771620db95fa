"""End to end: `notifier api`, `notifier worker`, `notifier scheduler` as real processes, a real
redis-server, the Dysmsapi fake (signature verified), an aiosmtpd SMTP server and the FCM fake.
Each Alertmanager fixture is posted and checked at the providers and in the ledger."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from notifier.cli import main
from notifier.client import intake_for
from notifier.config import settings_from_mapping
from notifier.models import Event, Source
from tests.fakes.dysmsapi import FakeDysmsapi
from tests.fakes.fcm import FakeFcm
from tests.fakes.smtp import FakeSmtp
from tests.support.servers import RedisServer, wait_until
from tests.support.stack import Stack

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
API_TOKEN = "e2e-api-token-9f8e7d"
AK_ID, AK_SECRET = "LTAI-e2e-id", "e2e-access-key-secret-0123456789"


def fixture(name: str) -> dict[str, Any]:
    return dict(json.loads((FIXTURES / name).read_text()))


@pytest.fixture(scope="module")
def fakes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    sms = FakeDysmsapi(AK_ID, AK_SECRET).start()
    smtp = FakeSmtp()
    smtp.start()
    fcm = FakeFcm()
    fcm.start()
    key_file = tmp_path_factory.mktemp("fcm") / "service-account.json"
    fcm.write_service_account(key_file)
    yield {"sms": sms, "smtp": smtp, "fcm": fcm, "key_file": key_file}
    sms.stop()
    smtp.stop()
    fcm.stop()


def service_config(fakes: dict[str, Any]) -> dict[str, Any]:
    return {
        "locale": "en",
        "channels": {
            "sms": {"provider": "aliyun", "endpoint": fakes["sms"].endpoint, "protocol": "http",
                    "sign_name": "运维告警", "read_timeout": "2s", "connect_timeout": "1s",
                    "templates": {"alert": "SMS_100001", "resolved": "SMS_100002",
                                  "drill": "SMS_100003"},
                    "retry": {"max_attempts": 3, "base_delay": "100ms", "max_delay": "500ms"},
                    "recipient_limits": []},  # these tests text alice often on purpose
            "email": {"provider": "smtp", "host": "127.0.0.1", "port": fakes["smtp"].port,
                      "sender": "notifier@example.com",
                      "retry": {"max_attempts": 3, "base_delay": "100ms", "max_delay": "500ms"}},
            "push": {"provider": "fcm", "project_id": "demo", "endpoint": fakes["fcm"].url,
                     "credentials_file": str(fakes["key_file"])},
        },
        "recipients": {
            "alice": {"phone": "+8613800138000", "email": "alice@example.com",
                      "push_tokens": ["fcm-token-alice"]},
            "bob": {"phone": "+8613900139000", "email": "bob@example.com", "locale": "zh-CN"},
            "carol": {"phone": "+8613700137000"},
        },
        "groups": {"oncall": ["alice", "bob"]},
        "routes": [
            {"match": {"severity": "critical"}, "to": ["oncall"], "channels": ["sms", "push"],
             "fallback": ["email"]},
            {"match": {}, "to": ["oncall"], "channels": ["email"]},
        ],
    }


@pytest.fixture(scope="module")
def stack(fakes: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    server = RedisServer()
    server.start()
    env = {"NOTIFIER_API_TOKEN": API_TOKEN, "NOTIFIER_CALLBACK_TOKEN": "e2e-callback-token",
           "ALIBABA_CLOUD_ACCESS_KEY_ID": AK_ID,
           "ALIBABA_CLOUD_ACCESS_KEY_SECRET": AK_SECRET, "NOTIFIER_LOG_LEVEL": "INFO"}
    # Two API processes on one port, as deployed on a multi-core host.
    running = Stack(tmp_path_factory.mktemp("stack"), server.url, service_config(fakes), env=env,
                    api_workers=2)
    running.start()
    yield running
    running.stop()
    server.close()


@pytest.fixture(autouse=True)
def clean_fakes(fakes: dict[str, Any]) -> None:
    fakes["sms"].reset()
    fakes["smtp"].reset()
    fakes["fcm"].reset()


def by_channel(view: dict[str, Any], channel: str) -> list[dict[str, Any]]:
    return [d for d in view["deliveries"] if d["channel"] == channel]


def test_critical_group_goes_out_by_sms_and_push(stack: Stack, fakes: dict[str, Any]) -> None:
    response = stack.post("/v1/alertmanager", fixture("alertmanager-critical-truncated.json"))
    assert response.status_code == 200
    view = stack.wait_final(response.json()["transaction_id"])
    assert view["status"] == "delivered", json.dumps(view, indent=1)

    sent = {m["phone_numbers"]: m for m in fakes["sms"].messages}
    assert set(sent) == {"13800138000", "13900139000"}
    sms = by_channel(view, "sms")
    for delivery in sms:
        message = sent[delivery["address"].removeprefix("+86")]
        # receipts find their delivery: by its own id, or the request's OutId and the number
        assert message["out_id"] == (delivery["sent_as"] or delivery["delivery_id"])
        assert message["template_code"] == "SMS_100001" and message["sign_name"] == "运维告警"
        params = message["template_param"]
        assert params and all(isinstance(v, str) and len(v) <= 35 for v in params.values())
        assert delivery["provider_message_id"] == message["biz_id"]
    pushes = fakes["fcm"].messages
    assert len(pushes) == 1
    assert pushes[0]["message"]["token"] == "fcm-token-alice"
    assert pushes[0]["message"]["data"]["transaction_id"] == view["transaction_id"]
    assert fakes["smtp"].messages == []  # nothing failed, so no fallback email


def test_one_events_sms_to_several_people_is_one_request_through_the_worker(
        stack: Stack, fakes: dict[str, Any]) -> None:
    # alice's push goes out within the dispatch task; both SMS (same text: both read English)
    # are one deliver task naming two deliveries, sent by a worker as one SendSms.
    txid = stack.post("/v1/events", {"title": "Batch check", "severity": "critical",
                                     "to": ["alice", "carol"], "channels": ["push", "sms"]}
                      ).json()["transaction_id"]
    view = stack.wait_final(txid)
    assert view["status"] == "delivered", json.dumps(view, indent=1)
    assert fakes["sms"].requests["SendSms"] == 1 and len(fakes["fcm"].messages) == 1
    sms = by_channel(view, "sms")
    assert sorted(m["phone"] for m in fakes["sms"].messages) == ["13700137000", "13800138000"]
    (biz_id,) = {m["biz_id"] for m in fakes["sms"].messages}
    assert [(d["recipient"], d["status"], d["provider_message_id"]) for d in sms] == [
        ("alice", "sent", biz_id), ("carol", "sent", biz_id)]


def test_warning_group_is_emailed_with_label_text_inert(stack: Stack, fakes: dict[str, Any]) -> None:
    txid = stack.post("/v1/alertmanager", fixture("alertmanager-firing.json")).json()["transaction_id"]
    assert stack.wait_final(txid)["status"] == "delivered"
    wait_until(lambda: len(fakes["smtp"].messages) == 2)
    mails = {m["To"]: m for m in fakes["smtp"].messages}
    alice = mails["alice@example.com"]
    assert alice["X-Notifier-Transaction-Id"] == txid and alice["Message-ID"]
    html = alice.get_body(("html",)).get_content()
    text = alice.get_body(("plain",)).get_content()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "<script>" not in html
    # The annotation's Jinja expression stays text: never evaluated to 49.
    assert "<script>alert(1)</script> {{ 7*7 }}" in text
    assert "</script> 49" not in text and "</script> 49" not in html
    assert "HighLatency" in str(alice["Subject"])

    again = stack.post("/v1/alertmanager", fixture("alertmanager-firing.json")).json()
    assert again == {"transaction_id": txid, "suppressed": True}

    resolved = stack.post("/v1/alertmanager", fixture("alertmanager-resolved.json")).json()
    assert stack.wait_final(resolved["transaction_id"])["status"] == "delivered"
    wait_until(lambda: len(fakes["smtp"].messages) == 4)
    subjects = [str(m["Subject"]) for m in fakes["smtp"].messages[2:]]
    assert all("RESOLVED" in s.upper() or "恢复" in s or "已解决" in s for s in subjects), subjects


def test_sms_permanent_error_falls_back_to_email(stack: Stack, fakes: dict[str, Any]) -> None:
    # Both people's SMS go in one request (a text each), refused; then each alone, refused.
    fakes["sms"].script({"kind": "business", "code": "isv.MOBILE_NUMBER_ILLEGAL",
                         "message": "非法手机号", "times": 3})
    response = stack.post("/v1/events", {"title": "Primary DB down", "severity": "critical",
                                         "body": "db-1 unreachable", "channels": ["sms"]})
    assert response.status_code == 202
    view = stack.wait_final(response.json()["transaction_id"])
    assert view["status"] == "delivered", json.dumps(view, indent=1)
    sms = by_channel(view, "sms")
    assert {d["status"] for d in sms} == {"fallen_back"}
    assert all(d["error_code"] == "isv.MOBILE_NUMBER_ILLEGAL" for d in sms)
    assert all([a["outcome"] for a in d["attempts"]] == ["batch_refused", "permanent"] for d in sms)
    emails = by_channel(view, "email")
    assert sorted(d["fallback_of"] for d in emails) == sorted(d["delivery_id"] for d in sms)
    assert {d["status"] for d in emails} == {"sent"}
    wait_until(lambda: len(fakes["smtp"].messages) == 2)


def test_transient_sms_error_is_retried_then_sent(stack: Stack, fakes: dict[str, Any]) -> None:
    fakes["sms"].script({"kind": "business", "code": "isp.SYSTEM_ERROR", "message": "系统错误"})
    response = stack.post("/v1/events", {"title": "Disk 91%", "severity": "critical",
                                         "to": ["alice"], "channels": ["sms"]})
    view = stack.wait_final(response.json()["transaction_id"])
    assert view["status"] == "delivered"
    (sms,) = by_channel(view, "sms")
    assert [a["outcome"] for a in sms["attempts"]] == ["transient", "sent"]
    assert sms["attempts"][0]["error_code"] == "isp.SYSTEM_ERROR"
    assert len(fakes["sms"].messages) == 1


def test_python_client_and_cli_status(stack: Stack, fakes: dict[str, Any]) -> None:
    settings = settings_from_mapping({**stack.config})
    accepted = intake_for(settings).submit(
        Event(kind="alert", title="from notify()", severity="warning", to=("alice",),
              channels=("email",)), Source.CLIENT)
    view = stack.wait_final(accepted.transaction_id)
    assert view["status"] == "delivered" and view["source"] == "client"
    out = subprocess.run([sys.executable, "-m", "notifier", "status", accepted.transaction_id],
                         env=stack.env, capture_output=True, text=True, timeout=30, check=True)
    assert accepted.transaction_id in out.stdout and "SENT" in out.stdout
    assert "email via smtp -> alice" in out.stdout


def test_secrets_never_in_api_output_or_logs(stack: Stack) -> None:
    txid = stack.post("/v1/events", {"title": "secret check", "to": ["alice"],
                                     "channels": ["sms"]}).json()["transaction_id"]
    view = stack.wait_final(txid)
    dumped = json.dumps(view) + stack.get("/metrics").text
    for name in ("api", "worker", "scheduler"):
        dumped += stack.log(name)
    assert AK_SECRET not in dumped and API_TOKEN not in dumped


def test_api_logs_one_json_line_per_accepted_event(stack: Stack) -> None:
    """Concurrent webhooks share one accept script call and one log record; each stored event
    still gets a JSON line of its own carrying its transaction ID, and a duplicate gets none."""
    def post(title: str) -> str:
        response = stack.post("/v1/events", {"title": title, "to": ["alice"], "channels": ["email"]})
        assert response.status_code == 202, response.text
        return str(response.json()["transaction_id"])

    with ThreadPoolExecutor(8) as pool:
        txids = list(pool.map(post, [f"log line {i}" for i in range(8)]))
    duplicate = stack.post("/v1/alertmanager", fixture("alertmanager-firing.json")).json()
    again = stack.post("/v1/alertmanager", fixture("alertmanager-firing.json")).json()
    assert again["transaction_id"] == duplicate["transaction_id"] and again.get("suppressed")

    def accepted_lines() -> list[dict[str, Any]]:
        lines = [json.loads(line) for line in stack.log("api").splitlines() if line.startswith("{")]
        return [line for line in lines if line["msg"].startswith("accepted ")]

    wait_until(lambda: {*txids, duplicate["transaction_id"]}
               <= {line.get("transaction_id") for line in accepted_lines()}, timeout=10)
    mine = [line for line in accepted_lines()
            if line.get("transaction_id") in {*txids, duplicate["transaction_id"]}]
    assert len(mine) == len(txids) + 1  # one each; the suppressed duplicate adds no line
    assert all(line["level"] == "info" and line["logger"] == "notifier.intake" for line in mine)
    by_id = {line["transaction_id"]: line["msg"] for line in mine}
    assert by_id[duplicate["transaction_id"]] == "accepted alert event from alertmanager"
    assert {by_id[t] for t in txids} == {"accepted alert event from api"}


def test_metrics_count_the_live_worker_for_each_queue_it_consumes(stack: Stack) -> None:
    """The stack's one `notifier worker` consumes every queue (its default --queues): its
    heartbeat thread makes each queue's gauge 1, as an API process reads it from Redis."""
    queues = ["notifier.dispatch", "notifier.control", "notifier.sms", "notifier.email",
              "notifier.push"]
    wanted = [f'notifier_workers_alive{{queue="{queue}"}} 1.0' for queue in queues]
    wait_until(lambda: all(line in stack.get("/metrics").text for line in wanted), timeout=15)


def test_up_keeps_a_redis_password_from_the_environment_off_disk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # `notifier up` writes its effective config to ./.notifier/notifier.yaml: NOTIFIER_REDIS_URL,
    # password and all, was written into it.
    server = RedisServer(appendonly=False, password="s3cret-redis-pass")
    server.start()
    try:
        monkeypatch.chdir(tmp_path)
        monkeypatch.delenv("NOTIFIER_API_TOKEN", raising=False)
        monkeypatch.setenv("NOTIFIER_REDIS_URL", f"redis://:s3cret-redis-pass@127.0.0.1:{server.port}/0")
        with socket.socket() as taken:  # the API cannot bind: `up` stops once it wrote the file
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            assert main(["up", "--sandbox", "--port", str(taken.getsockname()[1])]) == 2
        assert "s3cret-redis-pass" not in (tmp_path / ".notifier" / "notifier.yaml").read_text()
    finally:
        server.close()
