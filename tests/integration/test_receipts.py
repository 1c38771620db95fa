"""Aliyun delivery receipts on a real redis-server: the callback (store first), applying
receipts to the ledger (idempotent, early ones kept, failures fall back), and the reconciler
asking the Dysmsapi fake about SMS without a receipt. The pipeline runs inline, no Celery."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from notifier import awaiting
from notifier.api.app import create_app
from notifier.celery_app import CeleryPublisher, make_celery
from notifier.channels.sandbox import REPORT_DELAY, REPORT_TRIES, REPORTS, push_reports
from notifier.config import settings_from_mapping
from notifier.ledger import DeliveryRecord, delivery_key
from notifier.models import Event, Source
from notifier.periodic import KICK_TTL, clear_kick, periodic_jobs
from notifier.pipeline.dispatch import dispatch
from notifier.receipts import FAILED_CLASS, apply_due, receipt_inbox
from notifier.reconciler import reconcile
from notifier.tasks_spec import APPLY_RECEIPTS, CONTROL_QUEUE
from tests.fakes.dysmsapi import FakeDysmsapi
from tests.integration.conftest import MakeFleet
from tests.support.counters import counts
from tests.support.inline import InlineFleet, decode_task
from tests.support.servers import free_port

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
REPORT = "/v1/callbacks/aliyun/sms-report"
ACK = {"code": 0, "msg": "接收成功"}
CALLBACK_TOKEN = "cb-token-0123456789"
CONFIG: dict[str, Any] = {
    "channels": {"sms": {"provider": "sandbox"}, "email": {"provider": "sandbox"}},
    "recipients": {"alice": {"phone": "+8613800138000", "email": "alice@example.com"}},
    "routes": [{"match": {}, "to": ["alice"], "channels": ["sms"], "fallback": ["email"]}],
}


@pytest.fixture
def fleet(make_fleet: MakeFleet) -> InlineFleet:
    return make_fleet(CONFIG)


@pytest.fixture
def api(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    monkeypatch.setenv("NOTIFIER_CALLBACK_TOKEN", CALLBACK_TOKEN)
    with TestClient(create_app(settings_from_mapping({**CONFIG, "redis_url": redis_url}))) as c:
        yield c


def send_sms(fleet: InlineFleet, deliver: bool = True) -> DeliveryRecord:
    txid = fleet.intake.submit(Event(kind="alert", title="DiskFull db-1", severity="critical"),
                               Source.API).transaction_id
    if deliver:
        fleet.drain()
    else:  # fan out only: the delivery exists but has not been sent
        dispatch(fleet.deps, txid)
        fleet.publisher.tasks.clear()
    (sms,) = [d for d in fleet.deps.ledger.deliveries(txid) if d.channel == "sms"]
    return sms


def report(sms: DeliveryRecord, *, success: bool = True, biz_id: str | None = None,
           **changes: Any) -> dict[str, Any]:
    """The fixture's records, pointed at our delivery, exactly in Aliyun's format."""
    records = json.loads((FIXTURES / "aliyun-sms-report.json").read_text())
    record = dict(records[0] if success else records[1])
    record.update(out_id=sms.id, biz_id=biz_id or sms.provider_message_id or "900619746936498440^0",
                  phone_number="8613800138000")
    record.update(changes)
    return record


def post(api: TestClient, body: Any, token: str | None = CALLBACK_TOKEN) -> Any:
    params = {"token": token} if token is not None else {}
    return api.post(REPORT, params=params, content=json.dumps(body, ensure_ascii=False))


def receipt_counts(client: redis.Redis) -> dict[str, float]:
    return counts(client, "notifier_receipts", 1)


def test_receipt_is_stored_answered_and_applied_once_even_when_pushed_twice(
        fleet: InlineFleet, api: TestClient, redis_client: redis.Redis) -> None:
    sms = send_sms(fleet)
    assert sms.status == "sent" and sms.provider_message_id.startswith("sandbox-")
    body = [report(sms)]
    first, again = post(api, body), post(api, body)
    assert first.status_code == again.status_code == 200
    assert first.json() == again.json() == ACK
    # Stored first, then a task to apply it was published on the control queue.
    queued = [json.loads(m)["headers"]["task"] for m in redis_client.lrange(CONTROL_QUEUE, 0, -1)]
    assert queued == [APPLY_RECEIPTS]
    assert apply_due(fleet.deps) == {"delivered": 1}
    assert apply_due(fleet.deps) == {}
    post(api, body)  # a third push after it was applied changes nothing either
    assert apply_due(fleet.deps) == {}
    done = fleet.deps.ledger.delivery(sms.id)
    assert done is not None and done.status == "delivered"
    assert done.delivered_at is not None and done.sent_at is not None
    assert done.sent_at <= done.delivered_at <= time.time()
    outcomes = [a["outcome"] for a in fleet.deps.ledger.attempts(sms.id)]
    assert outcomes == ["sent", "receipt"]
    assert receipt_counts(redis_client) == {"delivered": 1.0, "duplicate": 2.0}
    tx = fleet.deps.ledger.transaction(sms.transaction_id)
    assert tx is not None and tx.status == "delivered"


def test_one_bad_record_does_not_cost_the_good_receipts_of_its_push(
        fleet: InlineFleet, api: TestClient, redis_client: redis.Redis,
        caplog: pytest.LogCaptureFixture) -> None:
    sms = send_sms(fleet)
    response = post(api, [report(sms), report(sms, biz_id="2^0", phone_number="12"),
                          {**report(sms, biz_id="3^0"), "success": "maybe"}])
    assert response.status_code == 200 and response.json() == ACK
    assert apply_due(fleet.deps) == {"delivered": 1}
    assert receipt_counts(redis_client) == {"delivered": 1.0, "invalid": 2.0}
    dropped = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(dropped) == 2 and "[1]" in dropped[0] and "phone_number" in dropped[0]
    assert "[2]" in dropped[1] and "success" in dropped[1] and "+86138****8000" in dropped[1]
    assert "8613800138000" not in caplog.text  # numbers are logged masked only


def test_receipt_before_its_send_is_kept_and_applied_once_the_send_is_recorded(
        fleet: InlineFleet, api: TestClient) -> None:
    sms = send_sms(fleet, deliver=False)
    assert sms.status == "queued"
    assert post(api, [report(sms, biz_id="932702304080415357^0")]).status_code == 200
    assert apply_due(fleet.deps) == {"early": 1}
    fleet.deps.ledger.claim(sms.id, "worker-token", lease=60)  # now mid-send
    time.sleep(1.1)  # an early receipt is retried after a second
    assert apply_due(fleet.deps) == {"early": 1}
    assert receipt_inbox(fleet.redis, 3600).pending() == 1  # kept, never dropped
    fleet.deps.ledger.update(sms.id, status="queued")
    fleet.publisher.publish("notifier.deliver", [sms.id], "notifier.sms")
    fleet.drain()
    time.sleep(1.1)
    assert apply_due(fleet.deps) == {"delivered": 1}
    done = fleet.deps.ledger.delivery(sms.id)
    assert done is not None and done.status == "delivered"
    assert receipt_inbox(fleet.redis, 3600).pending() == 0


def test_receipt_without_out_id_finds_its_delivery_by_biz_id(fleet: InlineFleet,
                                                             api: TestClient) -> None:
    sms = send_sms(fleet)
    body = [report(sms)]
    del body[0]["out_id"]
    assert post(api, body).status_code == 200
    assert apply_due(fleet.deps) == {"delivered": 1}


def test_failed_receipt_falls_back_like_a_permanent_error(fleet: InlineFleet, api: TestClient,
                                                          redis_client: redis.Redis) -> None:
    sms = send_sms(fleet)
    assert post(api, [report(sms, success=False)]).status_code == 200
    assert apply_due(fleet.deps) == {"failed": 1}
    fleet.drain()
    deliveries = {d.id: d for d in fleet.deps.ledger.deliveries(sms.transaction_id)}
    assert deliveries[sms.id].status == "fallen_back"
    assert deliveries[sms.id].error_code == "MK:0012"
    (email,) = [d for d in deliveries.values() if d.channel == "email"]
    assert email.fallback_of == sms.id and email.status == "sent"
    assert [a["outcome"] for a in fleet.deps.ledger.attempts(sms.id)] == ["sent",
                                                                           "receipt_failed"]
    # The same failure again (a re-push with another BizId) does not fall back twice.
    assert post(api, [report(sms, success=False, biz_id="other^0")]).status_code == 200
    assert apply_due(fleet.deps) == {"stale": 1}
    assert len(fleet.deps.ledger.deliveries(sms.transaction_id)) == 2
    assert receipt_counts(redis_client)["failed"] == 1.0


def test_a_failed_receipt_for_an_earlier_send_leaves_the_recorded_send_to_its_own(
        fleet: InlineFleet, api: TestClient, redis_client: redis.Redis) -> None:
    """An attempt timed out, went out after all (the look-up did not find it yet) and was sent
    again: its failed receipt (its own BizId) must not fail the delivery, whose send reached
    the phone, and page the person again on the fallback channel."""
    sms = send_sms(fleet)
    assert post(api, [report(sms, success=False, biz_id="earlier-send^0")]).status_code == 200
    assert apply_due(fleet.deps) == {"other_send": 1}
    fleet.drain()
    after = fleet.deps.ledger.delivery(sms.id)
    assert after is not None and after.status == "sent"
    assert [d.channel for d in fleet.deps.ledger.deliveries(sms.transaction_id)] == ["sms"]
    assert post(api, [report(sms)]).status_code == 200  # the recorded send's own receipt
    assert apply_due(fleet.deps) == {"delivered": 1}
    outcomes = [a["outcome"] for a in fleet.deps.ledger.attempts(sms.id)]
    assert outcomes == ["sent", "receipt_failed_other_send", "receipt"]
    assert receipt_counts(redis_client) == {"other_send": 1.0, "delivered": 1.0}


@pytest.mark.parametrize(("body", "status", "problem"), [
    (b"{not json", 400, "not valid JSON"),
    (b"", 400, "empty"),
    (b'{"phone_number": "8613800138000"}', 422, "expected a JSON array of SmsReport"),
    (b'[{"phone_number": "8613800138000", "success": true}]', 422, "[0].biz_id"),
    (b'[{"phone_number": "12", "success": true, "biz_id": "1^0"}]', 422, "[0].phone_number"),
    (b'[{"phone_number": "8613800138000", "success": "maybe", "biz_id": "1^0"}]', 422,
     "[0].success"),
])
def test_bad_report_bodies_get_a_4xx_naming_the_problem_and_store_nothing(
        api: TestClient, redis_client: redis.Redis, body: bytes, status: int, problem: str
) -> None:
    response = api.post(REPORT, params={"token": CALLBACK_TOKEN}, content=body)
    assert response.status_code == status
    assert problem in json.dumps(response.json(), ensure_ascii=False)
    assert receipt_inbox(redis_client, 3600).pending() == 0


def test_bad_sms_up_body_names_the_field(api: TestClient) -> None:
    response = api.post("/v1/callbacks/aliyun/sms-up", params={"token": CALLBACK_TOKEN},
                        json=[{"phone_number": "8613800138000", "sequence_id": "1"}])
    assert response.status_code == 422 and "[0].content" in response.text


@pytest.mark.parametrize("raw", [
    b"[" * 2000 + b"]" * 2000,  # past the JSON parser's recursion limit
    b'[{"phone_number": "13800138000", "content": "x", "sequence_id": ' + b"9" * 5000 + b"}]",
    b"\xff\xfe[]",  # not UTF-8
], ids=["nested-2000-deep", "int-5000-digits", "not-utf8"])
@pytest.mark.parametrize("path", [REPORT, "/v1/callbacks/aliyun/sms-up"])
def test_a_push_json_cannot_read_is_400(api: TestClient, path: str, raw: bytes) -> None:
    response = api.post(path, params={"token": CALLBACK_TOKEN}, content=raw,
                        headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert "not valid JSON" in response.text


def test_callbacks_require_the_token_and_never_echo_it(api: TestClient) -> None:
    body = [report(DeliveryRecord(id="tx-1.0", transaction_id="tx-1", channel="sms",
                                  recipient="alice", address="+8613800138000", kind="alert"))]
    for token in (None, "wrong-token"):
        for path in (REPORT, "/v1/callbacks/aliyun/sms-up"):
            params = {"token": token} if token else {}
            response = api.post(path, params=params, json=body)
            assert response.status_code == 401
            assert CALLBACK_TOKEN not in response.text
    assert post(api, body).status_code == 200


def test_storage_failure_answers_5xx_so_aliyun_pushes_again(monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    monkeypatch.delenv("NOTIFIER_CALLBACK_TOKEN", raising=False)
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    with TestClient(create_app(settings_from_mapping({**CONFIG, "redis_url": dead}))) as api:
        body = [{"phone_number": "8613800138000", "success": True, "biz_id": "1^0",
                 "out_id": "tx-1.0"}]
        for path in (REPORT, "/v1/callbacks/aliyun/sms-up"):
            payload = body if path == REPORT else [{"phone_number": "8613800138000",
                                                    "content": "123456", "sequence_id": "9"}]
            response = api.post(path, json=payload)
            assert response.status_code == 503, response.text
            assert response.json() != ACK


@pytest.fixture
def aliyun_fleet(sms_fake: FakeDysmsapi, make_fleet: MakeFleet) -> Callable[[], InlineFleet]:
    def make() -> InlineFleet:
        sms = {"provider": "aliyun", "endpoint": sms_fake.endpoint, "protocol": "http",
               "sign_name": "运维告警", "templates": {"alert": "SMS_1"},
               "read_timeout": "2s", "connect_timeout": "1s", "recipient_limits": []}
        cfg = {**CONFIG, "channels": {**CONFIG["channels"], "sms": sms}, "reconcile_after": 0}
        return make_fleet(cfg)

    return make


def test_reconciler_applies_what_querysenddetails_says(aliyun_fleet: Callable[[], InlineFleet],
                                                       sms_fake: FakeDysmsapi) -> None:
    fleet = aliyun_fleet()
    delivered = send_sms(fleet)
    sms_fake.script({"kind": "ok", "send_status": 2, "err_code": "IC:0001"})
    failed = send_sms(fleet)
    sms_fake.script({"kind": "ok", "send_status": 1})  # no final status yet
    waiting = send_sms(fleet)
    assert {delivered.status, failed.status, waiting.status} == {"sent"}
    assert reconcile(fleet.deps) == {"delivered": 1, "failed": 1, "waiting": 1}
    fleet.drain()
    ledger = fleet.deps.ledger
    assert ledger.delivery(delivered.id).status == "delivered"  # type: ignore[union-attr]
    assert ledger.delivery(failed.id).status == "fallen_back"  # type: ignore[union-attr]
    assert ledger.delivery(waiting.id).status == "sent"  # type: ignore[union-attr]
    email = [d for d in ledger.deliveries(failed.transaction_id) if d.channel == "email"]
    assert [d.status for d in email] == ["sent"]
    # Asked about again only after another interval, and a settled one never again.
    assert reconcile(fleet.deps) == {}
    queries = sms_fake.requests["QuerySendDetails"]
    assert queries >= 3


def test_a_failed_receipt_the_reconciler_applied_is_finished_if_its_worker_died(
        aliyun_fleet: Callable[[], InlineFleet], sms_fake: FakeDysmsapi,
        redis_client: redis.Redis) -> None:
    """QuerySendDetails said failed; the reconciling worker wrote the failure (its first write)
    and died before the fallback. No pushed receipt comes to apply it again: the next pass
    must finish it, not drop the delivery as settled."""
    fleet = aliyun_fleet()
    sms_fake.script({"kind": "ok", "send_status": 2, "err_code": "IC:0001"})
    sms = send_sms(fleet)
    redis_client.hset(delivery_key(sms.id), mapping={
        "status": "failed", "error_class": FAILED_CLASS, "error_code": "IC:0001"})
    reconcile(fleet.deps)
    reconcile(fleet.deps)
    fleet.drain()
    ledger = fleet.deps.ledger
    assert ledger.delivery(sms.id).status == "fallen_back"  # type: ignore[union-attr]
    email = [d for d in ledger.deliveries(sms.transaction_id) if d.channel == "email"]
    assert [d.status for d in email] == ["sent"], "the alert reached nobody"
    assert not awaiting.has_overdue(redis_client, time.time())


def test_sandbox_pushes_aliyun_receipts_that_close_the_loop(redis_url: str, api: TestClient,
                                                            redis_client: redis.Redis) -> None:
    url = f"http://testserver{REPORT}"  # the sandbox adds ?token= from the environment
    cfg = {**CONFIG, "channels": {**CONFIG["channels"],
                                  "sms": {"provider": "sandbox", "report_url": url}}}
    fleet = InlineFleet(redis_url, cfg)
    try:
        sms = send_sms(fleet)
        pushed: list[list[dict[str, Any]]] = []

        def post(target: str, body: list[dict[str, Any]]) -> bool:
            pushed.append(body)
            return bool(post_with(api, target, body).status_code == 200)

        sent_at = json.loads(fleet.redis.lindex(REPORTS, 0))["entry"]["at"]
        # A handset takes a moment: nothing before REPORT_DELAY, then the receipt.
        assert push_reports(fleet.redis, post, now=sent_at + REPORT_DELAY - 0.1) == 0
        assert push_reports(fleet.redis, post, now=sent_at + REPORT_DELAY) == 1
        (record,) = pushed[0]
        assert record["phone_number"] == "8613800138000"  # Aliyun's form, no '+'
        assert record["out_id"] == sms.id and record["biz_id"] == sms.provider_message_id
        assert record["success"] is True and record["err_code"] == "DELIVERED"
        assert apply_due(fleet.deps) == {"delivered": 1}
    finally:
        fleet.close()


def post_with(api: TestClient, target: str, body: list[dict[str, Any]]) -> Any:
    return api.post(target, params={"token": CALLBACK_TOKEN}, json=body)


def test_sandbox_receipt_push_is_retried_then_dropped(redis_url: str) -> None:
    url = "http://127.0.0.1:1/v1/callbacks/aliyun/sms-report"
    cfg = {**CONFIG, "channels": {**CONFIG["channels"],
                                  "sms": {"provider": "sandbox", "report_url": url}}}
    fleet = InlineFleet(redis_url, cfg)
    try:
        send_sms(fleet)
        tries: list[str] = []

        def refused(target: str, body: list[dict[str, Any]]) -> bool:
            tries.append(target)
            return False

        later = time.time() + REPORT_DELAY
        for _ in range(REPORT_TRIES + 2):
            assert push_reports(fleet.redis, refused, now=later) == 0
        assert len(tries) == REPORT_TRIES and fleet.redis.llen(REPORTS) == 0
    finally:
        fleet.close()


def test_scheduler_kicks_one_apply_task_for_stored_unapplied_receipts(
        fleet: InlineFleet, api: TestClient) -> None:
    jobs = dict((job.__name__, job) for _, job in periodic_jobs(fleet.settings, fleet.redis,
                                                                fleet.publisher))
    sms = send_sms(fleet)
    fleet.publisher.tasks.clear()
    jobs["apply_inboxes"]()
    assert fleet.publisher.tasks == []  # nothing stored: nothing to do
    assert post(api, [report(sms)]).status_code == 200
    jobs["apply_inboxes"]()
    jobs["apply_inboxes"]()  # still due, but a task is already on its way
    assert fleet.publisher.tasks == [(APPLY_RECEIPTS, [], CONTROL_QUEUE)]
    clear_kick(fleet.redis, APPLY_RECEIPTS)  # what the task does as it starts
    assert apply_due(fleet.deps) == {"delivered": 1}
    jobs["apply_inboxes"]()
    assert len(fleet.publisher.tasks) == 1


def test_a_kicked_task_waiting_for_a_worker_is_not_kicked_again(
        fleet: InlineFleet, api: TestClient) -> None:
    """No control worker (or a backlog on its queue): the kicked task waits in the queue, and
    the scheduler must not add another every KICK_TTL; a day without control workers queued
    thousands, ahead of the drill timers that share the queue once a worker came back."""
    broker = CeleryPublisher(make_celery(fleet.settings.redis_url))
    jobs = dict((job.__name__, job) for _, job in periodic_jobs(fleet.settings, fleet.redis, broker))
    sms = send_sms(fleet)
    assert post(api, [report(sms)]).status_code == 200

    def queued() -> list[str]:
        return [decode_task(m)[0] for m in fleet.redis.lrange(CONTROL_QUEUE, 0, -1)]
    jobs["apply_inboxes"]()
    waiting = queued()
    assert set(waiting) == {APPLY_RECEIPTS}
    deadline = time.monotonic() + KICK_TTL + 2
    while time.monotonic() < deadline:  # the scheduler's ticks while nobody takes the task
        jobs["apply_inboxes"]()
        time.sleep(1.0)
    assert queued() == waiting
