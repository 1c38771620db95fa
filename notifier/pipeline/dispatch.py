"""Expand an accepted transaction into deliveries; queue a deliver task for each but one, and
send that one in the same step. Deliveries a provider can send in one request (an event paging
several people by SMS) share a task, and the one sent here takes its batch along.

Sending one delivery inline saves a Celery task (publish, fetch, ack) for the common event with
a single delivery. It goes through `deliver`, the same code as a deliver task, with a claim
token derived from the dispatch task's id: a redelivery of the same dispatch message (worker
killed mid-send) re-claims it as 'reclaimed' and looks up a maybe-sent message first, exactly
as a redelivered deliver task would. If the whole worker dies, the reaper re-queues the inline
delivery like any other open one (it is on the open index from the moment it exists).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from notifier.ledger import DeliveryRecord
from notifier.models import DeliveryStatus, TxStatus
from notifier.pipeline.batching import by_provider
from notifier.pipeline.deliver import deliver_batch
from notifier.pipeline.deps import PipelineDeps
from notifier.pipeline.fanout import plan_deliveries
from notifier.pipeline.outcomes import Outcomes
from notifier.pipeline.routing import plan_route
from notifier.tasks_spec import DELIVER, DISPATCH, DISPATCH_QUEUE, deliver_queue

# Statuses in which a re-run dispatch takes its inline delivery up again (the claim decides
# whether this run may send it); any other state has an owner already (a timer, a receipt).
_RESUMABLE = (DeliveryStatus.QUEUED, DeliveryStatus.SENDING)
# A dispatch message names up to MAX_EVENTS transactions (one per event the API accepted in
# the same moment). Past this many seconds on one message, the rest go back on the queue as a
# new message, so a task never nears its time limit (celeryconfig: 60 s) however slow the
# provider, and idle workers share the remainder.
BATCH_BUDGET = 10.0


def inline_token(dispatch_task_id: str) -> str:
    """The claim token of a dispatch's inline delivery: the same on every redelivery of that
    dispatch message, and never a deliver task's token (those are task ids themselves)."""
    return f"dispatch:{dispatch_task_id}"


def dispatch_all(deps: PipelineDeps, txids: Sequence[str], token: str | None = None,
                 may_inline: Callable[[str], bool] = lambda _queue: True,
                 budget: float = BATCH_BUDGET) -> list[str]:
    """`dispatch` each transaction of one message in turn; what happened to each dispatched.

    Every step is idempotent, so a redelivered message simply runs again; transactions past the
    budget are re-queued (all of them, or none if that publish fails: the outbox sweep has
    them)."""
    started = time.monotonic()
    done: list[str] = []
    for position, txid in enumerate(txids):
        if position and time.monotonic() - started > budget:
            deps.publisher.publish(DISPATCH, list(txids[position:]), DISPATCH_QUEUE)
            break
        done.append(dispatch(deps, txid, token, may_inline))
    return done


def dispatch(deps: PipelineDeps, txid: str, token: str | None = None,
             may_inline: Callable[[str], bool] = lambda _queue: True) -> str:
    """Idempotent: a redelivered dispatch recreates nothing and re-queues only queued work.

    `token` (see `inline_token`): send one delivery here instead of queueing it; None queues
    every delivery. `may_inline(queue)`: whether this worker serves that delivery queue (a
    worker started for the dispatch queue only must not send SMS)."""
    ledger = deps.ledger
    tx, existing = ledger.transaction_and_deliveries(txid)
    if tx is None:
        ledger.fanned_out(txid)
        return "missing"
    if TxStatus(tx.status).terminal:
        ledger.fanned_out(txid)
        return "done"
    if existing:
        records = existing
        queued = [r for r in existing if r.status == DeliveryStatus.QUEUED]
        ledger.fanned_out(txid)
    else:
        plan = plan_route(deps.settings, tx.event, tx.receiver)
        if plan is None or not plan.recipients:
            ledger.log(txid, "no_route", detail="no route matched and the event named no recipients")
            ledger.finish(txid, TxStatus.FAILED)
            ledger.fanned_out(txid)
            return "no_route"
        records = plan_deliveries(deps.settings, txid, tx.event.kind, plan)
        new_ids = set(ledger.fan_out(txid, records, deliveries=str(len(records)),
                                     route="-" if plan.route_index is None else str(plan.route_index)))
        queued = [r for r in records if r.id in new_ids]
    inline = _inline_pick(records, may_inline) if token is not None else None
    outcomes = Outcomes(deps)
    sendable: list[DeliveryRecord] = []
    for record in queued:
        if not record.address:
            outcomes.fall_back(record, "no_address", record.reason)
        else:
            sendable.append(record)
    ours: set[str] = set()  # what this dispatch sends itself, under its own claim token
    if token is not None:
        # A re-run of this dispatch takes up again what its first run sent itself (the inline
        # delivery, the batch it went in): only this token may take those claims over, so they
        # are sent here, never handed to a deliver task.
        ours = {r.id for r in records if r.status in _RESUMABLE
                and (r is inline or r.claim_token == token)}
        listed = {r.id for r in sendable}
        sendable += [r for r in records if r.id in ours and r.id not in listed]
    here: list[list[DeliveryRecord]] = []
    for batch in by_provider(deps, sendable):
        if any(r.id in ours for r in batch):
            here.append(batch)
        else:
            deps.publisher.publish(DELIVER, [r.id for r in batch], deliver_queue(batch[0].channel))
    for batch in here:  # empty without a token
        deliver_batch(deps, [r.id for r in batch], str(token), tx=tx)
    return "dispatched"


def _inline_pick(records: list[DeliveryRecord], may_inline: Callable[[str], bool]
                 ) -> DeliveryRecord | None:
    """The delivery a dispatch sends itself: the first of the route's plan that has an address.
    The same one on every run of this dispatch (plan order is the order of the delivery list)."""
    for record in records:
        if record.fallback_of or record.digest_of:
            continue  # created later by another step, never by the plan
        if record.address and may_inline(deliver_queue(record.channel)):
            return record
        return None
    return None

