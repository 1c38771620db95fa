"""The accept script's call: one round trip that stores an event and queues its dispatch task.

Built here as plain data so the synchronous ledger (the client, drills, replays) and the API's
batched asynchronous path (notifier.api.script_batch) run the very same script call.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import orjson

from notifier.celery_wire import TaskMessages
from notifier.metrics import metric_field, metric_key
from notifier.models import Event, Source, TxStatus
from notifier.records import AcceptOutcome, AcceptResult, text
from notifier.tasks_spec import DISPATCH, DISPATCH_QUEUE

PREFIX = "ntf:"
OUTBOX = f"{PREFIX}outbox"  # accepted transactions not yet fanned out (txid -> sweep after)
_EVENTS = "notifier_events_received"
_DISPATCH = TaskMessages(DISPATCH, DISPATCH_QUEUE)


@dataclass(frozen=True)
class AcceptPolicy:
    retention: float
    dedup_window: float = 600.0
    idempotency_ttl: float = 86400.0
    # The sweep re-publishes a transaction only if it is still not fanned out after this long
    # (its dispatch task was queued with it, so normally it never has to).
    sweep_after: float = 60.0


@dataclass(frozen=True)
class AcceptCall:
    keys: list[str]
    args: list[str | int]
    kind: str  # for the caller's log line
    source: str


def accept_call(txid: str, event: Event, source: Source, policy: AcceptPolicy, *,
                receiver: str = "", dedup_key: str | None = None,
                idempotency_key: str | None = None, body_hash: str = "") -> AcceptCall:
    now = time.time()
    _, message = _DISPATCH.message([txid])
    record = [
        "id", txid,
        "source", source.value,
        "status", TxStatus.ACCEPTED.value,
        "event", orjson.dumps(event.to_json()).decode(),  # 10x json.dumps: the ingest hot path
        "created_at", repr(now),
        "updated_at", repr(now),
        "receiver", receiver,
    ]
    keys = [
        f"{PREFIX}tx:{txid}",
        f"{PREFIX}dedup:{dedup_key}" if dedup_key else "",
        f"{PREFIX}idem:{idempotency_key}" if idempotency_key else "",
        OUTBOX,
        metric_key(_EVENTS),
        DISPATCH_QUEUE,
    ]
    args: list[str | int] = [txid, repr(now), int(policy.retention), int(policy.dedup_window * 1000),
                             int(policy.idempotency_ttl), body_hash, source.value, *_event_fields(source),
                             repr(now + max(policy.sweep_after - 5.0, 1.0)), message, *record]
    return AcceptCall(keys, args, event.kind, source.value)


@functools.cache
def _event_fields(source: Source) -> tuple[str, str, str]:
    new, duplicate, replay = (metric_field(_EVENTS, source=source.value, outcome=o)
                              for o in ("new", "duplicate", "replay"))
    return new, duplicate, replay


def accept_result(reply: list[bytes | str]) -> AcceptResult:
    outcome, txid = reply
    return AcceptResult(AcceptOutcome(text(outcome)), text(txid))
