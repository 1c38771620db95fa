"""The accept script's call: one round trip that stores events and queues their dispatch tasks.

Built here as plain data so the synchronous ledger (the client, drills, replays: one event per
call) and the API's batched asynchronous path (notifier.api.script_batch: the events accepted in
one event-loop iteration, or while the previous call was in flight, up to MAX_EVENTS) run the
very same script. A call queues one
dispatch message per EVENTS_PER_TASK of its events, so a burst of webhooks costs the worker
fleet one Celery task per few events instead of one per event; an event the script did not
store (a duplicate, a replay, a conflict) is named too and is skipped by the worker as missing.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import orjson

from notifier.celery_wire import TaskMessages
from notifier.ledger_keys import OUTBOX, PREFIX, tx_key
from notifier.metrics import metric_field, metric_key
from notifier.models import Event, Source, TxStatus
from notifier.records import AcceptOutcome, AcceptResult, text
from notifier.tasks_spec import DISPATCH, DISPATCH_QUEUE

# Per dispatch message. One worker child dispatches a message's events one after the other, so
# this bounds what a burst puts behind one child while others may be idle (8 slow SendSms
# calls), yet already amortises Celery's per-task cost (see bench/).
EVENTS_PER_TASK = 8
# Per script call: the call's own costs (the write, the reply, the log record, the script's
# counters and outbox) are shared by more events than one message carries. At saturation the
# bench's calls carry about 15 events (8 before), and Redis spends ≈ 15 % less per webhook
# (bench/RESULTS.md); a full call holds Redis for about a millisecond.
MAX_EVENTS = 4 * EVENTS_PER_TASK
_EVENTS = "notifier_events_received"
_DISPATCH = TaskMessages(DISPATCH, DISPATCH_QUEUE)
_ACCEPTED = TxStatus.ACCEPTED.value


@dataclass(frozen=True)
class AcceptPolicy:
    retention: float
    dedup_window: float = 600.0
    idempotency_ttl: float = 86400.0
    # The sweep re-publishes a transaction only if it is still not fanned out after this long
    # (its dispatch task was queued with it, so normally it never has to).
    sweep_after: float = 60.0


class AcceptCall(NamedTuple):
    """One event's part of an accept script call (a tuple: the API builds one per webhook)."""
    txid: str
    keys: tuple[str, str, str]  # its transaction, dedup key (or ''), idempotency key (or '')
    args: list[str | bytes | int]  # its 9 values of the script's ARGV
    kind: str  # for the caller's log line
    source: str


class ScriptCall(NamedTuple):
    keys: list[str]
    args: list[str | bytes | int]


class Stored(NamedTuple):
    """How a transaction keeps its event (read back by notifier.sources.stored_event): as the
    Event's JSON (field "event"), or, for Alertmanager, as the webhook's body as received (field
    "webhook"): the API then stores the bytes it validated instead of building and encoding an
    Event per webhook (a tenth of its time per webhook), and a reader builds the Event."""
    field: str
    value: str | bytes


EVENT_FIELD, WEBHOOK_FIELD = "event", "webhook"


def event_json(event: Event) -> Stored:
    return Stored(EVENT_FIELD, orjson.dumps(event.to_json()).decode())  # 10x json.dumps


def webhook_body(body: bytes) -> Stored:
    return Stored(WEBHOOK_FIELD, body)


def accept_call(txid: str, kind: str, stored: Stored, source: Source, *, receiver: str = "",
                dedup_key: str | None = None, idempotency_key: str | None = None,
                body_hash: str = "") -> AcceptCall:
    origin, new, duplicate, replay = _SOURCE_ARGS[source]
    args: list[str | bytes | int] = [txid, body_hash, origin, new, duplicate, replay,
                                     stored.field, stored.value, receiver]
    keys = (tx_key(txid), f"{PREFIX}dedup:{dedup_key}" if dedup_key else "",
            f"{PREFIX}idem:{idempotency_key}" if idempotency_key else "")
    return AcceptCall(txid, keys, args, kind, origin)


def script_call(calls: Sequence[AcceptCall], policy: AcceptPolicy) -> ScriptCall:
    """One script call accepting `calls` in order (at most MAX_EVENTS) and queueing a dispatch
    message for each EVENTS_PER_TASK of them that stored one; the events' transactions are
    created at this call's time."""
    now = time.time()
    keys = [OUTBOX, metric_key(_EVENTS), DISPATCH_QUEUE]
    args: list[str | bytes | int] = [repr(now), int(policy.retention), int(policy.dedup_window * 1000),
                                     int(policy.idempotency_ttl),
                                     repr(now + max(policy.sweep_after - 5.0, 1.0)), EVENTS_PER_TASK,
                                     _ACCEPTED]
    for call in calls:
        keys.extend(call.keys)
        args.extend(call.args)
    txids = [call.txid for call in calls]
    args.extend(_DISPATCH.message(txids[start:start + EVENTS_PER_TASK])[1]
                for start in range(0, len(txids), EVENTS_PER_TASK))
    return ScriptCall(keys, args)


# Per source: its name and its events counter's fields for outcomes new, duplicate, replay
# (worked out once: an enum's .value alone costs a webhook almost a microsecond).
_SOURCE_ARGS = {source: (source.value, *(metric_field(_EVENTS, source=source.value, outcome=o)
                                         for o in ("new", "duplicate", "replay")))
                for source in Source}


_OUTCOMES = {form: o for o in AcceptOutcome for form in (o.value, o.value.encode())}


def accept_results(reply: list[bytes | str]) -> list[AcceptResult]:
    """The script's flat reply (outcome, txid, outcome, txid, ...), one result per event."""
    return [AcceptResult(_OUTCOMES[reply[i]], text(reply[i + 1])) for i in range(0, len(reply), 2)]
