"""The last attempt on a provider timed out after leaving ("maybe sent"): before the channel's
next provider or the route's fallback channel sends the alert again, it is looked up
(QuerySendDetails by OutId) on the provider that may have sent it."""

from __future__ import annotations

from typing import Any

from notifier.models import Event, Source
from tests.fakes.dysmsapi import FakeDysmsapi
from tests.integration.conftest import SMS_ENV, MakeFleet
from tests.integration.test_pipeline import FAST_RETRY, aliyun, outbox
from tests.support.inline import InlineFleet

HANG = {"kind": "hang", "seconds": 1}  # nothing reaches Aliyun, the read times out
STALL = {"kind": "stall", "seconds": 1.5}  # Aliyun accepts it, the answer comes too late


def _fleet(make_fleet: MakeFleet, fake: FakeDysmsapi, *, backup: bool) -> InlineFleet:
    sms = {**aliyun(fake), "recipient_limits": [], "retry": FAST_RETRY,
           "providers": [{"provider": "sandbox", "name": "backup"}] if backup else []}
    cfg: dict[str, Any] = {
        "channels": {"sms": sms, "email": {"provider": "sandbox"}},
        "recipients": {"alice": {"phone": "+8613800138000", "email": "alice@example.com"}},
        "routes": [{"match": {}, "to": ["alice"], "channels": ["sms"], "fallback": ["email"]}],
    }
    return make_fleet(cfg, SMS_ENV)


def _run(fleet: InlineFleet) -> str:
    txid = fleet.intake.submit(Event(kind="alert", title="DiskFull", severity="critical"),
                               Source.API).transaction_id
    fleet.drain(timers_until=8)
    return txid


def _attempts(fleet: InlineFleet, did: str) -> list[tuple[str, str]]:
    return [(a["provider"], a["outcome"]) for a in fleet.deps.ledger.attempts(did)]


def test_found_before_the_next_provider_is_recorded_sent_and_not_resent(
        make_fleet: MakeFleet, sms_fake: FakeDysmsapi) -> None:
    sms_fake.script(HANG, HANG, STALL)
    fleet = _fleet(make_fleet, sms_fake, backup=True)
    txid = _run(fleet)
    (delivery,) = fleet.deps.ledger.deliveries(txid)
    attempts = _attempts(fleet, delivery.id)
    assert [m["out_id"] for m in sms_fake.messages] == [delivery.id], attempts
    assert outbox(fleet, "sms") == [], attempts  # the backup did not send it again
    assert attempts == [("aliyun", "maybe_sent")] * 3 + [("aliyun", "found_after_timeout")]
    assert (delivery.status, delivery.provider) == ("sent", "aliyun")
    assert fleet.deps.ledger.transaction(txid).status == "delivered"  # type: ignore[union-attr]


def test_found_before_falling_back_sends_no_email(make_fleet: MakeFleet,
                                                   sms_fake: FakeDysmsapi) -> None:
    sms_fake.script(HANG, HANG, STALL)
    fleet = _fleet(make_fleet, sms_fake, backup=False)
    txid = _run(fleet)
    deliveries = fleet.deps.ledger.deliveries(txid)
    assert [(d.channel, d.status) for d in deliveries] == [("sms", "sent")]
    assert len(sms_fake.messages) == 1 and outbox(fleet, "email") == []


def test_not_found_moves_on_to_the_next_provider(make_fleet: MakeFleet,
                                                  sms_fake: FakeDysmsapi) -> None:
    sms_fake.script(HANG, HANG, HANG)
    fleet = _fleet(make_fleet, sms_fake, backup=True)
    txid = _run(fleet)
    (delivery,) = fleet.deps.ledger.deliveries(txid)
    assert _attempts(fleet, delivery.id) == [("aliyun", "maybe_sent")] * 3 + [
        ("aliyun", "not_found_after_timeout"), ("backup", "sent")]
    assert sms_fake.messages == [] and len(outbox(fleet, "sms")) == 1
    history = [h for h in fleet.deps.ledger.history(txid) if h["event"] == "provider_fallback"]
    assert [(h["to_provider"], h["reason"]) for h in history] == [("backup", "retries_exhausted")]


def test_not_found_with_no_provider_left_falls_back(make_fleet: MakeFleet,
                                                     sms_fake: FakeDysmsapi) -> None:
    sms_fake.script(HANG, HANG, HANG)
    fleet = _fleet(make_fleet, sms_fake, backup=False)
    txid = _run(fleet)
    assert [(d.channel, d.status) for d in fleet.deps.ledger.deliveries(txid)] == [
        ("sms", "fallen_back"), ("email", "sent")]
    assert len(outbox(fleet, "email")) == 1
