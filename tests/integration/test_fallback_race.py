"""Two deliveries of one alert to one person (sms and push) fail at the same moment in two
workers and both fall back to email: the person gets one email, not two."""

from __future__ import annotations

import json
import uuid
from typing import Any

from notifier.channels.sandbox import outbox_key
from notifier.ledger import DeliveryRecord, delivery_key
from notifier.ledger_counts import COUNTED, delivery_series
from notifier.models import DeliveryStatus, Event, Source
from notifier.pipeline.deliver import deliver
from notifier.pipeline.dispatch import _fan_out
from notifier.pipeline.outcomes import Outcomes
from notifier.receipts import FAILED_CLASS, Report, _set_if_sent, apply_report
from tests.integration.conftest import MakeFleet
from tests.support.inline import InlineFleet
from tests.support.interleave import interleaved

CFG: dict[str, Any] = {
    "channels": {"sms": {"provider": "sandbox", "recipient_limits": []},
                 "push": {"provider": "sandbox"}, "email": {"provider": "sandbox"}},
    "recipients": {"alice": {"phone": "+8613800138000", "email": "alice@example.com",
                             "push_tokens": ["tok-a"]}},
    "routes": [{"match": {}, "to": ["alice"], "channels": ["sms", "push"], "fallback": ["email"]}],
}


def fanned_out(fleet: InlineFleet) -> tuple[str, DeliveryRecord, DeliveryRecord]:
    """A critical event for alice, fanned out: (its transaction, its SMS, its push)."""
    txid = fleet.intake.submit(Event(kind="alert", title="DB down", severity="critical"),
                               Source.API).transaction_id
    fleet.publisher.tasks.clear()
    _fan_out(fleet.deps, [txid])
    sms, push = fleet.deps.ledger.deliveries(txid)
    return txid, sms, push


def test_two_channels_falling_back_at_once_send_one_email(make_fleet: MakeFleet) -> None:
    fleet = make_fleet(CFG)
    txid, sms, push = fanned_out(fleet)
    # The worst interleaving at the Redis level: worker B (push) runs its whole fallback just
    # before worker A (sms) sends its first command that names the email delivery it creates,
    # i.e. after whatever A has checked before that. (The client is wrapped, not our code.)
    a_successor = delivery_key(f"{sms.id}.f0")
    with interleaved(fleet.deps.ledger.redis, lambda args: a_successor in args,
                     lambda: Outcomes(fleet.deps).fall_back(push, "permanent", "UNREGISTERED")
                     ) as raced:
        a_result = Outcomes(fleet.deps).fall_back(sms, "permanent", "isv.MOBILE_NUMBER_ILLEGAL")
    fleet.drain()

    assert raced == ["fallen_back"] and a_result == "fallen_back"
    emails = [json.loads(x) for x in fleet.redis.lrange(outbox_key("email"), 0, -1)]
    shown = [(d.id, d.channel, d.status, d.reason) for d in fleet.deps.ledger.deliveries(txid)]
    assert len(emails) == 1, shown
    # The one that lost the race says which delivery carries its message.
    (email,) = [d for d in fleet.deps.ledger.deliveries(txid) if d.channel == "email"]
    lost = fleet.deps.ledger.delivery(sms.id)
    assert lost is not None and f"(carried by {email.id})" in lost.reason
    assert fleet.deps.ledger.transaction(txid).status == "delivered"  # type: ignore[union-attr]


def test_a_failed_email_does_not_carry_a_later_fallback(make_fleet: MakeFleet) -> None:
    """Only a live delivery carries the message: once the first email failed, the second
    channel's fallback sends another (the person must still be reached)."""
    fleet = make_fleet(CFG)
    txid, sms, push = fanned_out(fleet)
    Outcomes(fleet.deps).fall_back(sms, "permanent", "isv.MOBILE_NUMBER_ILLEGAL")
    (first,) = [d for d in fleet.deps.ledger.deliveries(txid) if d.channel == "email"]
    Outcomes(fleet.deps).fall_back(first, "permanent", "550")  # no fallback left: failed
    fleet.publisher.tasks.clear()
    Outcomes(fleet.deps).fall_back(push, "permanent", "UNREGISTERED")
    fleet.drain()
    emails = [d for d in fleet.deps.ledger.deliveries(txid) if d.channel == "email"]
    assert [(d.id, d.status) for d in emails] == [(first.id, "failed"), (f"{push.id}.f0", "sent")]


def test_a_receipt_fallback_cut_short_after_finding_its_carrier_is_finished_when_applied_again(
        make_fleet: MakeFleet) -> None:
    """A failed SMS receipt's worker killed right after the carrier check (the push's email
    already carries the alert): the ledger it leaves is the SMS failed, still counted sent, and
    marked carried. The receipt applied again finishes the fallback and counts it."""
    fleet = make_fleet(CFG)
    txid, sms, push = fanned_out(fleet)
    assert Outcomes(fleet.deps).fall_back(push, "permanent", "UNREGISTERED") == "fallen_back"
    (email,) = [d for d in fleet.deps.ledger.deliveries(txid) if d.channel == "email"]
    assert deliver(fleet.deps, sms.id, uuid.uuid4().hex) == "sent"
    sent_sms = fleet.deps.ledger.delivery(sms.id)
    assert sent_sms is not None
    report = Report(phone="+8613800138000", biz_id=sent_sms.provider_message_id, out_id=sms.id,
                    success=False, err_code="UNDELIV", err_msg="undelivered")
    # What the killed worker wrote: the receipt's failure, then the carrier check.
    assert _set_if_sent(fleet.deps, sent_sms, None, status=DeliveryStatus.FAILED.value,
                        error_code="UNDELIV", error_class=FAILED_CLASS)
    assert fleet.deps.ledger.add_fallback(sent_sms, "email", [])[0] == (email.id, "email")

    assert apply_report(fleet.deps, report) == "duplicate"
    after = fleet.deps.ledger.delivery(sms.id)
    assert after is not None and after.status == "fallen_back"
    assert f"(carried by {email.id})" in after.reason
    counted = fleet.redis.hget(delivery_key(sms.id), COUNTED)
    assert counted is not None and counted.decode() == delivery_series("sms", after.provider,
                                                                         "fallen_back")
