"""A worker killed in the middle of a fallback, after its successor was created and before the
failed delivery was marked fallen back: the redelivered task (or the reaper's) must finish
that fallback, not send the failed delivery again on its own channel as well."""

from __future__ import annotations

import json
import time
from typing import Any

from notifier.channels.sandbox import outbox_key
from notifier.models import Event, Source
from notifier.pipeline.dispatch import _fan_out
from notifier.pipeline.outcomes import Outcomes, _next_reachable, _successor
from notifier.pipeline.reaper import reap
from tests.integration.conftest import MakeFleet
from tests.support.inline import InlineFleet

CFG: dict[str, Any] = {
    "channels": {"sms": {"provider": "sandbox", "max_defer": "0.5s",
                         "recipient_limits": [{"rate": 1, "per": "2s", "burst": 1}]},
                 "email": {"provider": "sandbox"}},
    "recipients": {"alice": {"phone": "+8613800138000", "email": "alice@example.com"}},
    "routes": [{"match": {}, "to": ["alice"], "channels": ["sms"], "fallback": ["email"]}],
}


def second_alert_fanned_out(fleet: InlineFleet) -> str:
    """A first alert spends alice's SMS budget for the next 2 s; a second is fanned out (its
    deliveries exist, no task runs them). -> the second's transaction."""
    fleet.intake.submit(Event(kind="alert", title="first"), Source.API)
    fleet.drain()
    second = fleet.intake.submit(Event(kind="alert", title="second"), Source.API).transaction_id
    fleet.publisher.tasks.clear()
    _fan_out(fleet.deps, [second])
    return second


def recovered_after_the_budget_refills(fleet: InlineFleet, sms_id: str, txid: str
                                       ) -> tuple[list[Any], list[Any], list[Any]]:
    """Once the budget refilled, the reaper re-queues the SMS its killed worker left and the
    fleet runs everything. -> (SMS sent, emails sent, the transaction's deliveries)."""
    time.sleep(2.1)
    fleet.deps.claim_lease = 0.0
    assert sms_id in reap(fleet.deps.ledger, fleet.publisher, stale_after=0.0, lease=0.0)
    fleet.drain()
    texts = [json.loads(x) for x in fleet.redis.lrange(outbox_key("sms"), 0, -1)]
    emails = [json.loads(x) for x in fleet.redis.lrange(outbox_key("email"), 0, -1)]
    shown = [(d.id, d.channel, d.status, d.reason) for d in fleet.deps.ledger.deliveries(txid)]
    return texts, emails, shown


def test_a_fallback_cut_short_by_a_dead_worker_is_finished_not_sent_again(
        make_fleet: MakeFleet) -> None:
    fleet = make_fleet(CFG)
    ledger = fleet.deps.ledger
    second = second_alert_fanned_out(fleet)
    (sms,) = ledger.deliveries(second)
    # A worker claims it, is refused by alice's limit for longer than max_defer and starts the
    # fallback to email (Outcomes.fall_back): the successor is created, then the worker dies.
    claimed = ledger.claim(sms.id, "killed-worker", fleet.deps.claim_lease).delivery
    assert claimed is not None
    recipient = fleet.settings.recipients["alice"]
    hop = _next_reachable(recipient, claimed.fallback_chain)
    assert hop is not None
    channel, found, rest = hop
    ledger.add_fallback(claimed, channel, [_successor(claimed, channel, a, k, rest)
                                           for k, a in enumerate(found)])
    texts, emails, shown = recovered_after_the_budget_refills(fleet, sms.id, second)
    # The second alert reaches alice once: by the email its fallback created, not also by SMS.
    assert len(texts) == 1 and len(emails) == 1, shown
    assert [(d.channel, d.status) for d in ledger.deliveries(second)] == [
        ("sms", "fallen_back"), ("email", "sent")]
    assert ledger.transaction(second).status == "delivered"  # type: ignore[union-attr]


PUSH_CFG: dict[str, Any] = {
    **CFG,
    "channels": {**CFG["channels"], "push": {"provider": "sandbox"}},
    "recipients": {"alice": {**CFG["recipients"]["alice"], "push_tokens": ["tok-a"]}},
    "routes": [{"match": {}, "to": ["alice"], "channels": ["sms", "push"], "fallback": ["email"]}],
}


def test_a_delivery_found_carried_by_a_dead_worker_is_not_sent_again(
        make_fleet: MakeFleet) -> None:
    """The same, when the fallback found another delivery carrying the message (the push's
    email): the worker marked the SMS carried, then died before marking it fallen back."""
    fleet = make_fleet(PUSH_CFG)
    ledger = fleet.deps.ledger
    second = second_alert_fanned_out(fleet)
    sms, push = ledger.deliveries(second)
    Outcomes(fleet.deps).fall_back(push, "permanent", "UNREGISTERED")  # on to email
    claimed = ledger.claim(sms.id, "killed-worker", fleet.deps.claim_lease).delivery
    assert claimed is not None
    carrier, _ = ledger.add_fallback(claimed, "email", [
        _successor(claimed, "email", "alice@example.com", 0, [])])
    assert carrier is not None and carrier[1] == "email"
    texts, emails, shown = recovered_after_the_budget_refills(fleet, sms.id, second)
    assert len(texts) == 1 and len(emails) == 1, shown
    assert ledger.delivery(sms.id).status == "fallen_back"  # type: ignore[union-attr]
    assert ledger.transaction(second).status == "delivered"  # type: ignore[union-attr]
