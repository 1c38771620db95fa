"""An event that pages several people by SMS goes out as one SendSms naming all their numbers,
while each recipient keeps a delivery of their own: receipts, failures, fallback, rate limits and
look-ups after a crash stay per person. Real redis-server, the real Aliyun SDK against the
Dysmsapi fake (which checks its signature), real processes SIGKILLed mid-send."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from notifier.api.app import create_app
from notifier.channels.sandbox import REPORTS, push_reports
from notifier.config import settings_from_mapping
from notifier.ledger import DeliveryRecord
from notifier.ledger_keys import delivery_key, tx_key
from notifier.models import Event, Source
from notifier.pipeline.dispatch import dispatch, inline_token
from notifier.receipts import apply_due
from notifier.reconciler import reconcile
from tests.fakes.dysmsapi import FakeDysmsapi
from tests.integration.conftest import MakeFleet
from tests.integration.test_inline_dispatch import kill_mid_send
from tests.support.inline import InlineFleet

CALLBACK_TOKEN = "cb-token-batching-0123"
REPORT = "/v1/callbacks/aliyun/sms-report"
PEOPLE = {
    "alice": {"phone": "+8613800138000", "email": "alice@example.com"},
    "bob": {"phone": "+8613900139000", "email": "bob@example.com"},
    "carol": {"phone": "+8613700137000", "email": "carol@example.com"},
}


def config(fake: FakeDysmsapi | None, people: tuple[str, ...] = ("alice", "bob", "carol"),
           read_timeout: str = "500ms", **sms_extra: Any) -> dict[str, Any]:
    sms: dict[str, Any] = {"provider": "sandbox"} if fake is None else {
        "provider": "aliyun", "endpoint": fake.endpoint, "protocol": "http",
        "sign_name": "运维告警", "templates": {"alert": "SMS_1"}, "read_timeout": read_timeout,
        "connect_timeout": "500ms"}
    sms = {"recipient_limits": [], **sms, **sms_extra,
           "retry": {"max_attempts": 3, "base_delay": "50ms", "max_delay": "200ms", "jitter": 0}}
    return {
        "channels": {"sms": sms, "email": {"provider": "sandbox"}},
        "recipients": {**PEOPLE, "dave": {"phone": "+8613600136000", "locale": "zh-CN"}},
        "routes": [{"match": {}, "to": list(people), "channels": ["sms"], "fallback": ["email"]}],
        "claim_lease": "60s",
    }


def page(fleet: InlineFleet, title: str = "DiskFull db-1") -> str:
    event = Event(kind="alert", title=title, severity="critical")
    return fleet.intake.submit(event, Source.API).transaction_id


def sms_of(fleet: InlineFleet, txid: str) -> dict[str, DeliveryRecord]:
    return {d.recipient: d for d in fleet.deps.ledger.deliveries(txid) if d.channel == "sms"}


def outcomes(fleet: InlineFleet, delivery: DeliveryRecord) -> list[str]:
    return [a["outcome"] for a in fleet.deps.ledger.attempts(delivery.id)]


@pytest.fixture
def api(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    monkeypatch.setenv("NOTIFIER_CALLBACK_TOKEN", CALLBACK_TOKEN)
    with TestClient(create_app(settings_from_mapping({**config(None), "redis_url": redis_url}))) as c:
        yield c


def receipt(phone: str, biz_id: str, out_id: str | None, success: bool = True) -> dict[str, Any]:
    """An SmsReport record in Aliyun's form (number without '+', one record per number)."""
    return {"phone_number": phone.lstrip("+"), "send_time": "2026-11-23 10:00:00",
            "report_time": "2026-11-23 10:00:05", "success": success,
            "err_code": "DELIVERED" if success else "MK:0012",
            "err_msg": "用户接收成功" if success else "空号", "sms_size": "1",
            "biz_id": biz_id, **({"out_id": out_id} if out_id is not None else {})}


def test_an_event_paging_three_people_is_one_sendsms_with_a_delivery_each(
        make_fleet: MakeFleet, sms_fake: FakeDysmsapi, api: TestClient) -> None:
    fleet = make_fleet(config(sms_fake))
    txid = page(fleet)
    fleet.drain()
    assert sms_fake.requests["SendSms"] == 1
    sms = sms_of(fleet, txid)
    batch_id = sms["alice"].sent_as
    assert batch_id.startswith(f"{sms['alice'].id}+2.")  # the first member, 2 more, a digest
    assert sorted(m["phone"] for m in sms_fake.messages) == ["13700137000", "13800138000",
                                                             "13900139000"]
    assert {m["out_id"] for m in sms_fake.messages} == {batch_id}
    (biz_id,) = {m["biz_id"] for m in sms_fake.messages}
    for person in ("alice", "bob", "carol"):
        assert (sms[person].status, sms[person].sent_as) == ("sent", batch_id)
        assert sms[person].provider_message_id == biz_id
        assert outcomes(fleet, sms[person]) == ["sent"]
    assert fleet.deps.ledger.transaction(txid).status == "delivered"  # type: ignore[union-attr]

    # Receipts come one per number under the batch's OutId (or only its BizId): each finds its
    # own recipient, and bob's failure falls back for bob alone.
    body = [receipt(PEOPLE["alice"]["phone"], biz_id, batch_id),
            receipt(PEOPLE["bob"]["phone"], biz_id, batch_id, success=False),
            receipt(PEOPLE["carol"]["phone"], biz_id, None)]
    answer = api.post(REPORT, params={"token": CALLBACK_TOKEN}, json=body)
    assert answer.status_code == 200, answer.text
    assert apply_due(fleet.deps) == {"delivered": 2, "failed": 1}
    fleet.drain()
    sms = sms_of(fleet, txid)
    assert {p: d.status for p, d in sms.items()} == {"alice": "delivered", "bob": "fallen_back",
                                                     "carol": "delivered"}
    emails = [d for d in fleet.deps.ledger.deliveries(txid) if d.channel == "email"]
    assert [(e.recipient, e.fallback_of, e.status) for e in emails] == [("bob", sms["bob"].id, "sent")]


def test_a_number_the_carrier_refuses_fails_the_batch_and_only_its_owner_falls_back(
        make_fleet: MakeFleet, sms_fake: FakeDysmsapi) -> None:
    sms_fake.refused_numbers.add("13900139000")  # bob's
    # One SMS per person per hour: the smaller requests must not take the tokens again.
    fleet = make_fleet(config(sms_fake, recipient_limits=[{"rate": 1, "per": "1h", "burst": 1}]))
    txid = page(fleet)
    fleet.drain()
    # [alice bob carol] refused, then [alice] sent, [bob carol] refused, [bob] refused, [carol] sent
    assert sms_fake.requests["SendSms"] == 5
    assert sorted(m["phone"] for m in sms_fake.messages) == ["13700137000", "13800138000"]
    sms = sms_of(fleet, txid)
    assert outcomes(fleet, sms["alice"]) == ["batch_refused", "sent"]
    assert outcomes(fleet, sms["carol"]) == ["batch_refused", "batch_refused", "sent"]
    assert outcomes(fleet, sms["bob"]) == ["batch_refused", "batch_refused", "permanent"]
    assert {p: d.attempt for p, d in sms.items()} == {"alice": 1, "bob": 1, "carol": 1}
    assert {p: d.status for p, d in sms.items()} == {"alice": "sent", "bob": "fallen_back",
                                                     "carol": "sent"}
    assert sms["bob"].error_code == "isv.MOBILE_NUMBER_ILLEGAL"
    emails = [d.recipient for d in fleet.deps.ledger.deliveries(txid) if d.channel == "email"]
    assert emails == ["bob"]
    assert fleet.deps.ledger.transaction(txid).status == "delivered"  # type: ignore[union-attr]


def test_a_refused_template_fails_the_batch_in_one_request_and_everyone_falls_back(
        make_fleet: MakeFleet, sms_fake: FakeDysmsapi) -> None:
    sms_fake.script({"kind": "business", "code": "isv.SMS_TEMPLATE_ILLEGAL", "times": 1})
    fleet = make_fleet(config(sms_fake))
    txid = page(fleet)
    fleet.drain()
    assert sms_fake.requests["SendSms"] == 1  # not halved: no number of it could go
    sms = sms_of(fleet, txid)
    assert {p: (d.status, outcomes(fleet, d)) for p, d in sms.items()} == {
        p: ("fallen_back", ["permanent"]) for p in ("alice", "bob", "carol")}
    emails = sorted(d.recipient for d in fleet.deps.ledger.deliveries(txid) if d.channel == "email")
    assert emails == ["alice", "bob", "carol"]


def test_two_people_sharing_a_phone_get_a_request_each(make_fleet: MakeFleet,
                                                       sms_fake: FakeDysmsapi, api: TestClient) -> None:
    cfg = config(sms_fake)
    cfg["recipients"]["carol"] = {"phone": PEOPLE["alice"]["phone"]}  # the on-call handset
    fleet = make_fleet(cfg)
    txid = page(fleet)
    fleet.drain()
    assert sorted(len(set(m["phone"] for m in sms_fake.messages if m["biz_id"] == biz))
                  for biz in {m["biz_id"] for m in sms_fake.messages}) == [1, 2]
    sms = sms_of(fleet, txid)
    # their receipts (BizId + number) still find each of them
    body = [receipt(d.address, d.provider_message_id, d.sent_as or d.id) for d in sms.values()]
    assert api.post(REPORT, params={"token": CALLBACK_TOKEN}, json=body).status_code == 200
    assert apply_due(fleet.deps) == {"delivered": 3}
    assert {p: d.status for p, d in sms_of(fleet, txid).items()} == {
        "alice": "delivered", "bob": "delivered", "carol": "delivered"}


def test_the_reconciler_asks_about_a_batch_member_by_the_batchs_out_id(
        make_fleet: MakeFleet, sms_fake: FakeDysmsapi) -> None:
    fleet = make_fleet({**config(sms_fake, people=("alice", "bob")), "reconcile_after": 0})
    sms_fake.script({"kind": "ok", "send_status": 2, "err_code": "IC:0001"})  # bob's never arrives
    txid = page(fleet)
    fleet.drain()
    assert reconcile(fleet.deps) == {"failed": 2}  # both numbers of that one request failed
    fleet.drain()
    emails = sorted(d.recipient for d in fleet.deps.ledger.deliveries(txid) if d.channel == "email")
    assert emails == ["alice", "bob"]


def test_recipients_whose_messages_differ_get_a_request_each(make_fleet: MakeFleet,
                                                             sms_fake: FakeDysmsapi) -> None:
    fleet = make_fleet(config(sms_fake, people=("alice", "bob", "dave")))  # dave reads Chinese
    txid = page(fleet)
    fleet.drain()
    assert sms_fake.requests["SendSms"] == 2
    by_phone = {m["phone"]: m for m in sms_fake.messages}
    assert by_phone["13800138000"]["out_id"] == by_phone["13900139000"]["out_id"]
    assert by_phone["13600136000"]["template_param"] != by_phone["13800138000"]["template_param"]
    sms = sms_of(fleet, txid)
    assert (sms["dave"].sent_as, by_phone["13600136000"]["out_id"]) == ("", sms["dave"].id)
    assert {d.status for d in sms.values()} == {"sent"}


def test_a_recipient_over_their_limit_waits_while_the_others_go_together(
        make_fleet: MakeFleet, sms_fake: FakeDysmsapi) -> None:
    limit = [{"rate": 1, "per": "1h", "burst": 1}]
    fleet = make_fleet(config(sms_fake, recipient_limits=limit, max_defer="2h"))
    page(fleet, "first")
    fleet.drain()
    assert sms_fake.requests["SendSms"] == 1
    fleet.redis.delete(  # alice and carol got new budget; bob did not
        *fleet.redis.keys("ntf:tb:sms:+86138*"), *fleet.redis.keys("ntf:tb:sms:+86137*"))
    second = page(fleet, "second")
    fleet.drain()
    assert sms_fake.requests["SendSms"] == 2
    last = [m for m in sms_fake.messages if m["biz_id"] == sms_fake.messages[-1]["biz_id"]]
    assert sorted(m["phone"] for m in last) == ["13700137000", "13800138000"]
    sms = sms_of(fleet, second)
    assert (sms["alice"].status, sms["carol"].status) == ("sent", "sent")
    assert sms["bob"].status not in ("sent", "delivered", "failed")  # held back, not dropped


def test_a_batch_timing_out_after_the_provider_took_it_is_looked_up_for_each_not_resent(
        make_fleet: MakeFleet, sms_fake: FakeDysmsapi, api: TestClient) -> None:
    sms_fake.script({"kind": "stall", "seconds": 1.5})  # recorded, answered after the timeout
    fleet = make_fleet(config(sms_fake, people=("alice", "bob")))
    txid = page(fleet)
    fleet.drain(timers_until=3)
    sms = sms_of(fleet, txid)
    # each retried on its own, and its look-up matched the batch's OutId
    for person in ("alice", "bob"):
        assert outcomes(fleet, sms[person]) == ["maybe_sent", "found_after_timeout"]
        assert sms[person].status == "sent"
    assert len(sms_fake.messages) == 2 and sms_fake.requests["SendSms"] == 1
    # The look-up learnt no BizId (QuerySendDetails has none): receipts find them by OutId.
    (biz_id,) = {m["biz_id"] for m in sms_fake.messages}
    body = [receipt(PEOPLE[p]["phone"], biz_id, sms[p].sent_as) for p in ("alice", "bob")]
    assert api.post(REPORT, params={"token": CALLBACK_TOKEN}, json=body).status_code == 200
    assert apply_due(fleet.deps) == {"delivered": 2}


@pytest.mark.parametrize("provider_has_it", [True, False], ids=["accepted", "lost"])
def test_a_worker_killed_mid_batch_send_neither_loses_nor_duplicates(
        make_fleet: MakeFleet, sms_fake: FakeDysmsapi, redis_url: str,
        provider_has_it: bool) -> None:
    cfg = config(sms_fake, people=("alice", "bob"), read_timeout="10s")
    fleet = make_fleet(cfg)
    txid = page(fleet)
    fleet.publisher.tasks.clear()  # the dispatch runs in a worker process of its own
    sms_fake.script({"kind": "stall" if provider_has_it else "hang", "seconds": 20})
    kill_mid_send(redis_url, cfg, [txid], inline_token("task-1"), sms_fake,
                  provider_has_it=provider_has_it, in_flight=2 if provider_has_it else 1)
    sms = sms_of(fleet, txid)
    assert {d.status for d in sms.values()} == {"sending"}
    (batch_id,) = {d.sent_as for d in sms.values()}
    assert batch_id.startswith(f"{sms['alice'].id}+1.")
    # Celery redelivers the dispatch message (same task id): both are taken up again
    dispatch(fleet.deps, txid, inline_token("task-1"))
    sms = sms_of(fleet, txid)
    expected = ["found_after_timeout"] if provider_has_it else ["sent"]
    assert [outcomes(fleet, sms[p]) for p in ("alice", "bob")] == [expected, expected]
    assert sorted(m["phone"] for m in sms_fake.messages) == ["13800138000", "13900139000"]
    assert fleet.deps.ledger.transaction(txid).status == "delivered"  # type: ignore[union-attr]
    assert fleet.publisher.tasks == [] and fleet.redis.zcard("ntf:open") == 0


def test_a_dispatch_redelivered_after_part_of_its_batch_was_recorded_finishes_the_rest(
        make_fleet: MakeFleet, sms_fake: FakeDysmsapi) -> None:
    fleet = make_fleet(config(sms_fake))
    txid = page(fleet)
    fleet.publisher.tasks.clear()
    token = inline_token("task-1")
    dispatch(fleet.deps, txid, token)
    assert sms_fake.requests["SendSms"] == 1
    # As if the worker died after recording alice's send: bob and carol still hold the
    # dispatch's claim, mid-send, and alice is done.
    sms = sms_of(fleet, txid)
    for person in ("bob", "carol"):
        fleet.redis.hset(delivery_key(sms[person].id), mapping={
            "status": "sending", "claim_token": token, "claim_at": repr(time.time())})
    fleet.redis.hset(tx_key(txid), "status", "dispatching")  # so not rolled up yet
    dispatch(fleet.deps, txid, token)  # the same message again
    assert fleet.publisher.tasks == []  # not handed to a task that could not take the claims
    sms = sms_of(fleet, txid)
    assert [outcomes(fleet, sms[p]) for p in ("bob", "carol")] == [
        ["sent", "found_after_timeout"]] * 2
    assert {d.status for d in sms.values()} == {"sent"} and sms_fake.requests["SendSms"] == 1


def test_sandbox_reports_each_number_of_a_batch(redis_url: str, api: TestClient) -> None:
    cfg = config(None, people=("alice", "bob"), report_url=f"http://testserver{REPORT}")
    fleet = InlineFleet(redis_url, cfg)
    try:
        txid = page(fleet)
        fleet.drain()
        pushed: list[list[dict[str, Any]]] = []

        def post(url: str, body: list[dict[str, Any]]) -> bool:
            pushed.append(body)
            return bool(api.post(url, params={"token": CALLBACK_TOKEN}, json=body).status_code == 200)

        sent_at = json.loads(fleet.redis.lindex(REPORTS, 0))["entry"]["at"]
        assert push_reports(fleet.redis, post, now=sent_at + 5) == 1
        assert sorted(r["phone_number"] for r in pushed[0]) == ["8613800138000", "8613900139000"]
        assert apply_due(fleet.deps) == {"delivered": 2}
        assert {d.status for d in sms_of(fleet, txid).values()} == {"delivered"}
    finally:
        fleet.close()
