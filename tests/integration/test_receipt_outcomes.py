"""What an SMS receipt changes besides the delivery: the transaction's verdict (counted once,
dead-lettered when it turns failed), the deliveries counter (a delivery counted once per real
change, never again when a receipt is applied again) and the log lines. Real redis-server, the
pipeline inline (ported from the third review's repro tests)."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
import redis

from notifier.ledger import DeliveryRecord, delivery_key
from notifier.ledger_counts import COUNTED
from notifier.logs import JsonFormatter
from notifier.models import Event, Source
from notifier.receipts import FAILED_CLASS, Report, apply_report
from tests.integration.conftest import MakeFleet
from tests.support.counters import counts
from tests.support.inline import InlineFleet

PHONE = "+8613800138000"
NO_FALLBACK: dict[str, Any] = {
    "channels": {"sms": {"provider": "sandbox"}},
    "recipients": {"alice": {"phone": PHONE}},
    "routes": [{"match": {}, "to": ["alice"], "channels": ["sms"]}],
}
WITH_FALLBACK: dict[str, Any] = {
    "channels": {"sms": {"provider": "sandbox"}, "email": {"provider": "sandbox"}},
    "recipients": {"alice": {"phone": PHONE, "email": "alice@example.com"}},
    "routes": [{"match": {}, "to": ["alice"], "channels": ["sms"], "fallback": ["email"]}],
}


def sent_sms(fleet: InlineFleet) -> DeliveryRecord:
    txid = fleet.intake.submit(Event(kind="alert", title="DiskFull db-1", severity="critical"),
                               Source.API).transaction_id
    fleet.drain()
    (sms,) = [d for d in fleet.deps.ledger.deliveries(txid) if d.channel == "sms"]
    assert sms.status == "sent"
    return sms


def receipt(sms: DeliveryRecord, success: bool, phone: str = PHONE) -> Report:
    return Report(phone=phone, biz_id=sms.provider_message_id, out_id=sms.id, success=success,
                  err_code="" if success else "MOBILE_NOT_ON_SERVICE")


def test_mismatch_log_line_carries_the_transaction_id(make_fleet: MakeFleet,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    fleet = make_fleet(NO_FALLBACK)
    sms = sent_sms(fleet)
    with caplog.at_level(logging.WARNING, logger="notifier.receipts"):
        assert apply_report(fleet.deps, receipt(sms, True, phone="+8613900139000")) == "mismatch"
    (record,) = [r for r in caplog.records if r.name == "notifier.receipts"]
    line = json.loads(JsonFormatter().format(record))
    assert line["transaction_id"] == sms.transaction_id and line["delivery_id"] == sms.id


def test_transaction_failed_by_receipt_is_dead_lettered_and_counted_failed_once(
        make_fleet: MakeFleet, redis_client: redis.Redis) -> None:
    """Its sent SMS had made it delivered (counted, finished_at set); the failed receipt, with no
    fallback left, makes it failed: dead-lettered, the count moved, once however often the
    receipt is applied."""
    fleet = make_fleet(NO_FALLBACK)
    sms = sent_sms(fleet)
    assert apply_report(fleet.deps, receipt(sms, False)) == "failed"
    assert apply_report(fleet.deps, receipt(sms, False)) == "duplicate"
    tx = fleet.deps.ledger.transaction(sms.transaction_id)
    assert tx is not None and tx.status == "failed"
    assert [t for t, _ in fleet.deps.ledger.dead_letters()] == [sms.transaction_id]
    assert counts(redis_client, "notifier_transactions_finished") == {"delivered": 1.0,
                                                                      "failed": 1.0}
    assert counts(redis_client, "notifier_transactions_revised") == {"delivered": 1.0}


def test_transaction_rescued_by_fallback_after_a_failed_receipt_stays_delivered(
        make_fleet: MakeFleet, redis_client: redis.Redis) -> None:
    fleet = make_fleet(WITH_FALLBACK)
    sms = sent_sms(fleet)
    assert apply_report(fleet.deps, receipt(sms, False)) == "failed"
    fleet.drain()  # the email carries it
    tx = fleet.deps.ledger.transaction(sms.transaction_id)
    assert tx is not None and tx.status == "delivered"
    assert fleet.deps.ledger.dead_letters() == []
    assert counts(redis_client, "notifier_transactions_finished") == {"delivered": 1.0}
    assert counts(redis_client, "notifier_transactions_revised") == {}



def test_delivered_receipt_moves_the_count_from_sent_to_delivered(
        make_fleet: MakeFleet, redis_client: redis.Redis) -> None:
    fleet = make_fleet(NO_FALLBACK)
    sms = sent_sms(fleet)
    for _ in range(2):  # applied again: a duplicate, nothing counted
        apply_report(fleet.deps, receipt(sms, True))
    assert counts(redis_client, "notifier_deliveries") == {"sent": 1.0, "delivered": 1.0}
    assert counts(redis_client, "notifier_deliveries_revised", 0, 1, 2) == {"sms sandbox sent": 1.0}


def test_failed_receipt_counts_the_delivery_failed_once(make_fleet: MakeFleet,
                                                       redis_client: redis.Redis) -> None:
    """Counted sent when the provider took it, failed when its receipt says so, and nothing
    more however often the receipt is applied again (the reconciler's query, a re-push): net,
    one delivery, failed; one failure line in its history."""
    fleet = make_fleet(NO_FALLBACK)
    sms = sent_sms(fleet)
    assert apply_report(fleet.deps, receipt(sms, False)) == "failed"
    for _ in range(2):
        assert apply_report(fleet.deps, receipt(sms, False)) == "duplicate"
    assert net_deliveries(redis_client) == {"failed": 1.0}
    assert counts(redis_client, "notifier_deliveries") == {"sent": 1.0, "failed": 1.0}
    events = [h["event"] for h in fleet.deps.ledger.history(sms.transaction_id)]
    assert events.count("delivery_failed") == 1, events


def test_failed_receipt_with_a_fallback_counts_it_fallen_back(make_fleet: MakeFleet,
                                                              redis_client: redis.Redis) -> None:
    fleet = make_fleet(WITH_FALLBACK)
    sms = sent_sms(fleet)
    assert apply_report(fleet.deps, receipt(sms, False)) == "failed"
    fleet.drain()
    assert apply_report(fleet.deps, receipt(sms, False)) == "stale"
    assert net_deliveries(redis_client, 0, 2) == {"sms fallen_back": 1.0, "email sent": 1.0}


def test_a_failed_receipt_whose_worker_died_is_finished_and_counted_once(
        make_fleet: MakeFleet, redis_client: redis.Redis) -> None:
    """The receipt's first write (the delivery failed, error_class receipt) happened, then its
    worker died before the fallback: applying it again finishes that, counted once."""
    fleet = make_fleet(NO_FALLBACK)
    sms = sent_sms(fleet)
    redis_client.hset(delivery_key(sms.id), mapping={
        "status": "failed", "error_class": FAILED_CLASS, "error_code": "MOBILE_NOT_ON_SERVICE"})
    assert apply_report(fleet.deps, receipt(sms, False)) == "duplicate"
    assert apply_report(fleet.deps, receipt(sms, False)) == "duplicate"
    assert net_deliveries(redis_client) == {"failed": 1.0}
    assert [t for t, _ in fleet.deps.ledger.dead_letters()] == [sms.transaction_id]


def test_a_delivery_sent_by_an_older_version_is_moved_not_counted_twice(
        make_fleet: MakeFleet, redis_client: redis.Redis) -> None:
    """Versions before counted_as counted a sent delivery without writing that down."""
    fleet = make_fleet(NO_FALLBACK)
    sms = sent_sms(fleet)
    redis_client.hdel(delivery_key(sms.id), COUNTED)
    assert apply_report(fleet.deps, receipt(sms, False)) == "failed"
    assert net_deliveries(redis_client) == {"failed": 1.0}


def net_deliveries(client: redis.Redis, *labels: int) -> dict[str, float]:
    """What ended each way: the deliveries counter minus its revisions (zeros left out)."""
    out = counts(client, "notifier_deliveries", *labels)
    for name, value in counts(client, "notifier_deliveries_revised", *labels).items():
        out[name] -= value
    return {name: value for name, value in out.items() if value}
