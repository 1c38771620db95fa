"""Expand an accepted transaction into deliveries; queue a deliver task for each but one, and
send that one in the same step. Deliveries a provider can send in one request (an event paging
several people by SMS) share a task, and the one sent here takes its batch along.

Sending one delivery inline saves a Celery task (publish, fetch, ack) for the common event with
a single delivery. It goes through `deliver`, the same code as a deliver task, with a claim
token derived from the dispatch task's id: a redelivery of the same dispatch message (worker
killed mid-send) re-claims it as 'reclaimed' and looks up a maybe-sent message first, exactly
as a redelivered deliver task would. If the whole worker dies, the reaper re-queues the inline
delivery like any other open one (it is on the open index from the moment it exists).

A message names the events the API accepted in the same moment: they are read in one round
trip and fanned out in another, before the first send. A worker dying after that leaves only
queued deliveries, which the redelivered message (or the reaper) sends as above. What the
dispatch sends itself through a provider that carries a text per recipient (SendBatchSms) is
held, claimed and ready, until an event needs a number the held set has already (one request
never carries a number twice) or the message's events are all prepared, and then sent in as
few requests as the provider takes: an alert storm paging different people costs one request
per message instead of one per event. A held claim waits at most the message's time budget
(BATCH_BUDGET, far inside the claim lease) and the requests before its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from notifier.channels.base import Channel
from notifier.ledger import DeliveryRecord, FanOut, TransactionRecord
from notifier.ledger_rows import Unreadable
from notifier.models import DeliveryStatus, TxStatus
from notifier.pipeline.batching import by_provider, provider_for
from notifier.pipeline.deliver import Ready, prepare, send_prepared
from notifier.pipeline.deps import PipelineDeps
from notifier.pipeline.fanout import plan_deliveries
from notifier.pipeline.outcomes import Outcomes
from notifier.pipeline.redis_wait import until_redis_answers
from notifier.pipeline.routing import plan_route
from notifier.tasks_spec import DELIVER, DISPATCH, DISPATCH_QUEUE, deliver_queue

# Statuses in which a re-run dispatch takes its inline delivery up again (the claim decides
# whether this run may send it); any other state has an owner already (a timer, a receipt).
_RESUMABLE = (DeliveryStatus.QUEUED, DeliveryStatus.SENDING)
# A dispatch message names up to ledger_accept.EVENTS_PER_TASK transactions (one per event the
# API accepted in the same moment). Past this many seconds on one message, the rest go back on
# the queue as a new message, so a task never nears its time limit (celeryconfig: 60 s) however
# slow the provider, and idle workers share the remainder.
BATCH_BUDGET = 10.0
# Redis (the ledger, or the broker on it) unavailable part-way through a message: its events
# may be fanned out with some send tasks not published yet, and Celery acks a failed task, so
# the message runs again once Redis answers (notifier.pipeline.redis_wait), for up to
# OUTAGE_WAIT s from its start; a longer outage is left to the reaper as before. A run again
# that starts past the message's budget starts no send of its own (a provider call may take
# MAX_SEND_SECONDS, which fits the 50 s soft time limit only when it starts within the budget;
# cut by that limit, a send is maybe sent, and an email went out twice): it queues its first
# event's deliveries as tasks, which have time limits of their own, and takes up only the
# claims this message holds (no other task may take those over before claim_lease).
OUTAGE_WAIT = 20.0


def inline_token(dispatch_task_id: str) -> str:
    """The claim token of a dispatch's inline delivery: the same on every redelivery of that
    dispatch message, and never a deliver task's token (those are task ids themselves)."""
    return f"dispatch:{dispatch_task_id}"


class _Held:
    """Deliveries this dispatch has prepared for a provider that can carry other events'
    messages in the same request, waiting for the message's next events to join them."""

    def __init__(self, deps: PipelineDeps) -> None:
        self.deps = deps
        self.ready: list[Ready] = []
        self.addresses: set[tuple[str, str]] = set()

    @staticmethod
    def shares(provider: Channel | None) -> bool:
        return provider is not None and provider.limits.max_mixed_batch > 1

    def make_room(self, records: Sequence[DeliveryRecord]) -> None:
        """Send what is held first if these records need a number it holds already."""
        if any((r.channel, r.address) in self.addresses for r in records
               if self.shares(provider_for(self.deps, r))):
            self.flush()

    def add(self, ready: Ready) -> None:
        self.ready.append(ready)
        self.addresses.add((ready.rec.channel, ready.rec.address))

    def flush(self) -> None:
        ready, self.ready = self.ready, []
        self.addresses.clear()
        send_prepared(self.deps, ready)


@dataclass(frozen=True)
class _Fanned:
    """A transaction with its deliveries, ready for its sends."""
    tx: TransactionRecord
    records: list[DeliveryRecord]
    queued: list[DeliveryRecord]  # still to send (created by this fan-out, or left queued)


def dispatch_all(deps: PipelineDeps, txids: Sequence[str], token: str | None = None,
                 may_inline: Callable[[str], bool] = lambda _queue: True,
                 *, budget: float = BATCH_BUDGET, outage_wait: float = OUTAGE_WAIT) -> list[str]:
    """Dispatch the transactions of one message: what happened to each dispatched.

    Idempotent: a redelivered message recreates nothing and re-queues only queued work. All the
    transactions are read in one round trip and fanned out in another, then each one's
    deliveries go out in turn (`token`, `may_inline`: see `dispatch`). Transactions past the
    budget are re-queued as one new message; they are fanned out already, so it only sends.
    Redis lost part-way: the message runs again once it is back (see OUTAGE_WAIT)."""
    deadline = time.monotonic() + budget
    txids = list(dict.fromkeys(txids))  # a message naming one twice: once is enough
    runs = 0

    def run() -> list[str]:
        nonlocal runs
        runs += 1
        return _dispatch_once(deps, txids, token, may_inline, deadline, again=runs > 1)

    return until_redis_answers(run, wait=outage_wait, what="dispatch")


def _dispatch_once(deps: PipelineDeps, txids: list[str], token: str | None,
                   may_inline: Callable[[str], bool], deadline: float, *, again: bool) -> list[str]:
    """One run of a message; past `deadline` (its budget, counted from the first run) the rest
    of its transactions go back on the queue as a new message, and a run `again` (see
    OUTAGE_WAIT) sends nothing of the first one's but its own claims."""
    ready = _fan_out(deps, txids)
    done: list[str] = []
    held = _Held(deps)
    try:
        for position, txid in enumerate(txids):
            if position and time.monotonic() > deadline:
                deps.publisher.publish(DISPATCH, list(txids[position:]), DISPATCH_QUEUE)
                break
            fanned = ready[txid]
            if isinstance(fanned, str):
                done.append(fanned)
                continue
            late = again and time.monotonic() > deadline
            done.append(_send(deps, fanned, token, may_inline, held, fresh=not late))
    finally:
        # Also when a later event failed (Celery acks a failed task: no redelivery): the held
        # ones are claimed by this message alone and would wait for the reaper's lease.
        held.flush()
    return done


def dispatch(deps: PipelineDeps, txid: str, token: str | None = None,
             may_inline: Callable[[str], bool] = lambda _queue: True) -> str:
    """Dispatch one transaction: route it, fan it out into deliveries and send them.

    `token` (see `inline_token`): send one delivery here instead of queueing it; None queues
    every delivery. `may_inline(queue)`: whether this worker serves that delivery queue (a
    worker started for the dispatch queue only must not send SMS)."""
    return dispatch_all(deps, [txid], token, may_inline)[0]


def _fan_out(deps: PipelineDeps, txids: Sequence[str]) -> dict[str, _Fanned | str]:
    """Each transaction fanned out, or what it came to instead (missing, done, no route)."""
    ledger = deps.ledger
    ready: dict[str, _Fanned | str] = {}
    settled: list[str] = []  # off the outbox: nothing (more) to fan out
    writes: list[tuple[TransactionRecord, FanOut]] = []
    for txid, (tx, existing) in zip(txids, ledger.transactions_and_deliveries(txids), strict=True):
        if isinstance(tx, Unreadable):
            # The rest of its message still goes out. Not fanned out yet: it fails on its own,
            # as a dead letter. Fanned out or finished before it became unreadable: its status
            # is left as it is (its deliveries may well have been sent).
            known = TxStatus.of(tx.status)
            if not existing and not (known is not None and known.terminal):
                ledger.log(txid, "unreadable", detail=tx.detail)
                ledger.finish(txid, TxStatus.FAILED)
            ready[txid] = "unreadable"
            settled.append(txid)
        elif tx is None or TxStatus(tx.status).terminal:
            ready[txid] = "missing" if tx is None else "done"
            settled.append(txid)
        elif existing:
            ready[txid] = _Fanned(tx, existing, [r for r in existing if r.status == DeliveryStatus.QUEUED])
            settled.append(txid)
        elif (plan := plan_route(deps.settings, tx.event, tx.receiver)) is None or not plan.recipients:
            ledger.log(txid, "no_route", detail="no route matched and the event named no recipients")
            ledger.finish(txid, TxStatus.FAILED)
            ready[txid] = "no_route"
            settled.append(txid)
        else:
            records = plan_deliveries(deps.settings, txid, tx.event.kind, plan)
            detail = {"deliveries": str(len(records)),
                      "route": "-" if plan.route_index is None else str(plan.route_index)}
            writes.append((tx, FanOut(txid, records, detail)))
    ledger.fanned_out(*settled)
    created = ledger.fan_out([write for _tx, write in writes])
    for (tx, write), new_ids in zip(writes, created, strict=True):
        new = set(new_ids)
        records = list(write.records)
        ready[tx.id] = _Fanned(tx, records, [r for r in records if r.id in new])
    return ready


def _send(deps: PipelineDeps, fanned: _Fanned, token: str | None,
          may_inline: Callable[[str], bool], held: _Held, *, fresh: bool = True) -> str:
    """Queue a transaction's deliveries, or send them here: those this dispatch sends itself
    (see `inline_token`) with their batch; of those, what could share a request with other
    events' messages joins `held` instead. Not `fresh`: only what this dispatch has claimed
    already is sent here, the inline pick not claimed yet is queued like the others."""
    records, tx = fanned.records, fanned.tx
    inline = _inline_pick(records, may_inline) if token is not None and fresh else None
    outcomes = Outcomes(deps)
    sendable: list[DeliveryRecord] = []
    for record in fanned.queued:
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
    mine = [r for batch in here for r in batch]  # empty without a token
    held.make_room(mine)
    now: list[Ready] = []
    for record in mine:
        prepared = prepare(deps, record.id, str(token), tx)
        if isinstance(prepared, str):
            continue
        if held.shares(prepared.provider):
            held.add(prepared)
        else:
            now.append(prepared)
    send_prepared(deps, now)
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

