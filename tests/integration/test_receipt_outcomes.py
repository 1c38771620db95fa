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

from notifier.ledger import DeliveryRecord
from notifier.logs import JsonFormatter
from notifier.metrics import KEY as METRICS_KEY
from notifier.models import Event, Source
from notifier.receipts import Report, apply_report
from tests.integration.conftest import MakeFleet
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


def counts(client: redis.Redis, metric: str, label: int = -1) -> dict[str, float]:
    """A counter's values summed by one of its labels (default: the last)."""
    out: dict[str, float] = {}
    for field, value in client.hgetall(f"{METRICS_KEY}{metric}").items():
        name = json.loads(field)[label]
        out[name] = out.get(name, 0.0) + float(value)
    return out
