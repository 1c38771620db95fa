"""Expand an accepted transaction into deliveries and queue one deliver task per delivery."""

from __future__ import annotations

from notifier.ledger import DeliveryRecord
from notifier.models import DeliveryStatus, TxStatus
from notifier.pipeline.deps import PipelineDeps
from notifier.pipeline.fanout import plan_deliveries
from notifier.pipeline.outcomes import Outcomes
from notifier.pipeline.routing import plan_route
from notifier.tasks_spec import DELIVER, deliver_queue


def dispatch(deps: PipelineDeps, txid: str) -> str:
    """Idempotent: a redelivered dispatch recreates nothing and re-queues only queued work."""
    ledger = deps.ledger
    tx = ledger.transaction(txid)
    if tx is None:
        ledger.fanned_out(txid)
        return "missing"
    if TxStatus(tx.status).terminal:
        ledger.fanned_out(txid)
        return "done"
    existing = ledger.deliveries(txid)
    if existing:
        records: list[DeliveryRecord] = existing
        new_ids = {r.id for r in existing if r.status == DeliveryStatus.QUEUED}
    else:
        plan = plan_route(deps.settings, tx.event, tx.receiver)
        if plan is None or not plan.recipients:
            ledger.log(txid, "no_route", detail="no route matched and the event named no recipients")
            ledger.set_status(txid, TxStatus.FAILED)
            ledger.dead_letter(txid)
            deps.metrics.inc("notifier_transactions_finished", status="failed")
            ledger.fanned_out(txid)
            return "no_route"
        records = plan_deliveries(deps.settings, txid, tx.event.kind, plan)
        ledger.set_status(txid, TxStatus.DISPATCHING)
        new_ids = set(ledger.add_deliveries(records))
        ledger.log(txid, "dispatched", deliveries=str(len(records)),
                   route="-" if plan.route_index is None else str(plan.route_index))
    outcomes = Outcomes(deps)
    for record in records:
        if record.id not in new_ids:
            continue
        if not record.address:
            outcomes.fall_back(record, "no_address", record.reason)
            continue
        deps.publisher.publish(DELIVER, [record.id], deliver_queue(record.channel))
    ledger.fanned_out(txid)
    return "dispatched"
