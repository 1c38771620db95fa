"""Events of one dispatch message paging different people go out as one SendBatchSms, each
number with its own text, while each event keeps its own delivery: receipts, a refused number,
extension codes and a worker killed mid-request stay per event. Real redis-server, the real
Aliyun SDK against the Dysmsapi fake (which checks its signature, form body included), real
processes SIGKILLed mid-send."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from notifier.breaker import BreakerState
from notifier.errors import BrokerUnavailable
from notifier.ledger import DeliveryRecord
from notifier.models import Event, Source
from notifier.pipeline.dispatch import dispatch_all, inline_token
from notifier.receipts import apply_due
from tests.fakes.dysmsapi import FakeDysmsapi
from tests.integration.conftest import MakeFleet
from tests.integration.test_inline_dispatch import kill_mid_send
from tests.integration.test_sms_batching import CALLBACK_TOKEN, PEOPLE, REPORT, api, outcomes, receipt
from tests.integration.test_sms_batching import config as batching_config
from tests.support.inline import InlineFleet

__all__ = ["api"]  # the fixture, shared with the single-event batching tests
TOKEN = inline_token("task-1")
PHONE = {name: person["phone"].removeprefix("+86") for name, person in PEOPLE.items()}


def config(fake: FakeDysmsapi, **sms_extra: Any) -> dict[str, Any]:
    """Each event pages the one person its `pager` label names, by SMS, email as fallback."""
    cfg = batching_config(fake, **sms_extra)
    cfg["routes"] = [{"match": {"pager": name}, "to": [name], "channels": ["sms"],
                      "fallback": ["email"]} for name in PEOPLE]
    return cfg


def accept_together(fleet: InlineFleet, *pages: tuple[str, str],
                    extra: dict[str, dict[str, str]] | None = None,
                    kinds: dict[str, str] | None = None) -> list[str]:
    """Accept (person, title) events in one script call, as the API does with concurrent
    webhooks; returns the transactions the one dispatch message names."""
    calls = [fleet.intake.prepare(Event(kind=(kinds or {}).get(title, "alert"), title=title,
                                        labels={"pager": person},
                                        extra=(extra or {}).get(title, {})),
                                  Source.ALERTMANAGER, dedup_key=f"group-{title}")
             for person, title in pages]
    fleet.deps.ledger.accept(fleet.intake.script_call(calls))
    fleet.take_queued_dispatches()
    [(_task, named, _queue)] = fleet.publisher.tasks
    fleet.publisher.tasks.clear()
    return list(named)


def sms(fleet: InlineFleet, txid: str) -> DeliveryRecord:
    (delivery,) = [d for d in fleet.deps.ledger.deliveries(txid) if d.channel == "sms"]
    return delivery


def by_phone(fake: FakeDysmsapi) -> dict[str, dict[str, Any]]:
    return {m["phone"]: m for m in fake.messages}


def test_events_paging_different_people_share_one_sendbatchsms(
        make_fleet: MakeFleet, sms_fake: FakeDysmsapi, api: TestClient) -> None:
    fleet = make_fleet(config(sms_fake))
    named = accept_together(fleet, ("alice", "DiskFull db-1"), ("bob", "HighLatency api"),
                            ("carol", "NodeDown web-3"))
    assert dispatch_all(fleet.deps, named, TOKEN) == ["dispatched"] * 3
    assert (sms_fake.requests["SendBatchSms"], sms_fake.requests["SendSms"]) == (1, 0)
    assert fleet.publisher.tasks == []
    deliveries = [sms(fleet, txid) for txid in named]
    batch_id = deliveries[0].sent_as
    assert batch_id.startswith(f"{deliveries[0].id}+2.")
    sent = by_phone(sms_fake)
    # each number got its own event's text, under the request's one OutId and BizId
    for person, title in (("alice", "DiskFull db-1"), ("bob", "HighLatency api"),
                          ("carol", "NodeDown web-3")):
        assert title in "".join(sent[PHONE[person]]["template_param"].values())
    assert {m["out_id"] for m in sent.values()} == {batch_id}
    (biz_id,) = {m["biz_id"] for m in sent.values()}
    for delivery in deliveries:
        assert (delivery.status, delivery.sent_as, delivery.provider_message_id) == (
            "sent", batch_id, biz_id)
        assert outcomes(fleet, delivery) == ["sent"]
    assert [fleet.deps.ledger.transaction(t).status for t in named] == ["delivered"] * 3  # type: ignore[union-attr]

    # One receipt per number: each finds its own event; bob's failure falls back for bob alone.
    body = [receipt(PEOPLE["alice"]["phone"], biz_id, batch_id),
            receipt(PEOPLE["bob"]["phone"], biz_id, batch_id, success=False),
            receipt(PEOPLE["carol"]["phone"], biz_id, None)]
    assert api.post(REPORT, params={"token": CALLBACK_TOKEN}, json=body).status_code == 200
    assert apply_due(fleet.deps) == {"delivered": 2, "failed": 1}
    fleet.drain()
    assert [sms(fleet, t).status for t in named] == ["delivered", "fallen_back", "delivered"]
    emails = [(d.recipient, d.status) for t in named for d in fleet.deps.ledger.deliveries(t)
              if d.channel == "email"]
    assert emails == [("bob", "sent")]


def test_events_for_the_same_number_never_share_a_request(
        make_fleet: MakeFleet, sms_fake: FakeDysmsapi, api: TestClient) -> None:
    fleet = make_fleet(config(sms_fake))
    named = accept_together(fleet, ("alice", "first"), ("bob", "second"), ("alice", "third"))
    dispatch_all(fleet.deps, named, TOKEN)
    # the held [alice bob] went out when the third event needed alice again; then [alice]
    assert (sms_fake.requests["SendBatchSms"], sms_fake.requests["SendSms"]) == (1, 1)
    requests = {m["biz_id"] for m in sms_fake.messages}
    assert sorted(sorted(m["phone"] for m in sms_fake.messages if m["biz_id"] == b)
                  for b in requests) == [[PHONE["alice"]], sorted([PHONE["alice"], PHONE["bob"]])]
    # so alice's two receipts (BizId + number) still tell her two events apart
    body = [receipt(d.address, d.provider_message_id, d.sent_as or d.id)
            for d in (sms(fleet, t) for t in named)]
    assert api.post(REPORT, params={"token": CALLBACK_TOKEN}, json=body).status_code == 200
    assert apply_due(fleet.deps) == {"delivered": 3}
    assert [sms(fleet, t).status for t in named] == ["delivered"] * 3


def test_a_number_refused_in_a_shared_request_fails_only_its_event(
        make_fleet: MakeFleet, sms_fake: FakeDysmsapi) -> None:
    sms_fake.refused_numbers.add(PHONE["bob"])
    # One SMS per person per hour: the smaller requests must not take the tokens again.
    fleet = make_fleet(config(sms_fake, recipient_limits=[{"rate": 1, "per": "1h", "burst": 1}]))
    named = accept_together(fleet, ("alice", "A"), ("bob", "B"), ("carol", "C"))
    dispatch_all(fleet.deps, named, TOKEN)
    fleet.drain()
    # [alice bob carol] refused, [alice] sent, [bob carol] refused, [bob] refused, [carol] sent
    assert (sms_fake.requests["SendBatchSms"], sms_fake.requests["SendSms"]) == (2, 3)
    assert sorted(by_phone(sms_fake)) == sorted([PHONE["alice"], PHONE["carol"]])
    alice, bob, carol = (sms(fleet, t) for t in named)
    assert outcomes(fleet, alice) == ["batch_refused", "sent"]
    assert outcomes(fleet, carol) == ["batch_refused", "batch_refused", "sent"]
    assert outcomes(fleet, bob) == ["batch_refused", "batch_refused", "permanent"]
    assert (bob.status, bob.error_code) == ("fallen_back", "isv.MOBILE_NUMBER_ILLEGAL")
    assert [fleet.deps.ledger.transaction(t).status for t in named] == ["delivered"] * 3  # type: ignore[union-attr]
    # each records the OutId its SMS went out under (alone: its own id), not an earlier try's
    sent = by_phone(sms_fake)
    assert [sent[PHONE[p]]["out_id"] for p in ("alice", "carol")] == [alice.id, carol.id]
    assert (alice.sent_as, carol.sent_as) == ("", "")


def test_one_numbers_minute_window_halves_a_shared_request_without_tripping_the_breaker(
        make_fleet: MakeFleet, sms_fake: FakeDysmsapi) -> None:
    fleet = make_fleet(config(sms_fake))
    sms_fake.script({"kind": "business", "code": "isv.BUSINESS_LIMIT_CONTROL",
                     "message": "触发分钟级流控Permits:1"})  # once, for the shared request
    named = accept_together(fleet, ("alice", "A"), ("bob", "B"), ("carol", "C"))
    dispatch_all(fleet.deps, named, TOKEN)
    # [alice bob carol] refused; [alice] and [bob carol] went: nobody waits a minute for one
    assert (sms_fake.requests["SendBatchSms"], sms_fake.requests["SendSms"]) == (2, 1)
    deliveries = [sms(fleet, t) for t in named]
    assert [outcomes(fleet, d) for d in deliveries] == [["batch_refused", "sent"]] * 3
    sent = by_phone(sms_fake)
    assert [sent[PHONE[p]]["out_id"] for p in PHONE] == [d.sent_as or d.id for d in deliveries]
    breaker = fleet.deps.breaker_for("sms:aliyun", fleet.settings.channels["sms"].breaker)
    status = breaker.status()
    assert (status.state, status.failures) == (BreakerState.CLOSED, 0)


def test_templates_of_different_kinds_never_share_a_request(
        make_fleet: MakeFleet, sms_fake: FakeDysmsapi) -> None:
    fleet = make_fleet(config(sms_fake, templates={"alert": "SMS_1", "resolved": "SMS_2"}))
    named = accept_together(fleet, ("alice", "A"), ("bob", "B"), ("carol", "C"),
                            kinds={"B": "resolved"})
    dispatch_all(fleet.deps, named, TOKEN)
    assert (sms_fake.requests["SendBatchSms"], sms_fake.requests["SendSms"]) == (1, 1)
    sent = by_phone(sms_fake)
    assert [(sent[PHONE[p]]["action"], sent[PHONE[p]]["template_code"]) for p in PHONE] == [
        ("SendBatchSms", "SMS_1"), ("SendSms", "SMS_2"), ("SendBatchSms", "SMS_1")]


def test_a_failure_mid_message_still_sends_what_was_held(
        make_fleet: MakeFleet, sms_fake: FakeDysmsapi, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config(sms_fake)
    cfg["routes"][1]["channels"] = ["sms", "email"]  # bob's page also queues an email task
    fleet = make_fleet(cfg)
    named = accept_together(fleet, ("alice", "A"), ("bob", "B"))

    def broker_down(task: str, args: list[str], queue: str) -> None:
        raise BrokerUnavailable("redis unavailable: ConnectionError")

    monkeypatch.setattr(fleet.publisher, "publish", broker_down)
    with pytest.raises(BrokerUnavailable):  # an outage longer than the message waits for Redis
        dispatch_all(fleet.deps, named, TOKEN, outage_wait=0.0)
    # Celery acks the failed task: alice's claimed, held SMS went out rather than wait for the
    # reaper; bob's was never claimed and is queued for the outbox sweep's re-publish
    assert list(by_phone(sms_fake)) == [PHONE["alice"]]
    assert sms(fleet, named[0]).status == "sent" and sms(fleet, named[1]).status == "queued"


def test_extension_codes_ride_per_number_and_never_mix_with_none(
        make_fleet: MakeFleet, sms_fake: FakeDysmsapi) -> None:
    fleet = make_fleet(config(sms_fake))
    codes = {"drill-1": {"sms_up_extend_code": "4711"}, "drill-2": {"sms_up_extend_code": "4712"}}
    named = accept_together(fleet, ("alice", "drill-1"), ("bob", "drill-2"), ("carol", "plain"),
                            extra=codes)
    dispatch_all(fleet.deps, named, TOKEN)
    # the two with codes in one SendBatchSms; the one without alone
    assert (sms_fake.requests["SendBatchSms"], sms_fake.requests["SendSms"]) == (1, 1)
    sent = by_phone(sms_fake)
    assert [sent[PHONE[p]]["sms_up_extend_code"] for p in ("alice", "bob", "carol")] == [
        "4711", "4712", None]
    assert sent[PHONE["alice"]]["action"] == sent[PHONE["bob"]]["action"] == "SendBatchSms"
    assert [sms(fleet, t).status for t in named] == ["sent"] * 3


@pytest.mark.parametrize("provider_has_it", [True, False], ids=["accepted", "lost"])
def test_a_worker_killed_mid_sendbatchsms_neither_loses_nor_duplicates(
        make_fleet: MakeFleet, sms_fake: FakeDysmsapi, redis_url: str,
        provider_has_it: bool) -> None:
    cfg = config(sms_fake, read_timeout="10s")
    fleet = make_fleet(cfg)
    named = accept_together(fleet, ("alice", "A"), ("bob", "B"), ("carol", "C"))
    sms_fake.script({"kind": "stall" if provider_has_it else "hang", "seconds": 20})
    kill_mid_send(redis_url, cfg, named, TOKEN, sms_fake, provider_has_it=provider_has_it,
                  in_flight=3 if provider_has_it else 1)
    deliveries = [sms(fleet, t) for t in named]
    assert {d.status for d in deliveries} == {"sending"}
    (batch_id,) = {d.sent_as for d in deliveries}
    assert batch_id.startswith(f"{deliveries[0].id}+2.")
    # Celery redelivers the message (same task id): each is looked up under the batch's OutId
    assert dispatch_all(fleet.deps, named, TOKEN) == ["dispatched"] * 3
    expected = ["found_after_timeout"] if provider_has_it else ["sent"]
    assert [outcomes(fleet, sms(fleet, t)) for t in named] == [expected] * 3
    assert sorted(m["phone"] for m in sms_fake.messages) == sorted(PHONE.values())
    assert [fleet.deps.ledger.transaction(t).status for t in named] == ["delivered"] * 3  # type: ignore[union-attr]
    assert fleet.publisher.tasks == [] and fleet.redis.zcard("ntf:open") == 0
