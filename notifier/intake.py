"""Accepting an event: validate, store durably, then publish its dispatch task.

The API, the Alertmanager adapter and `notify()` all come through here. A caller is told
"accepted" only once the transaction is in Redis and its dispatch task has been published;
a transaction stored but not published stays in the outbox, and the scheduler re-publishes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from dataclasses import dataclass

import redis

from notifier.config import Settings
from notifier.errors import BrokerUnavailable, IdempotencyConflict, InvalidEvent
from notifier.ids import new_transaction_id
from notifier.ledger import AcceptOutcome, Ledger
from notifier.metrics import Metrics
from notifier.models import Event, Source
from notifier.pipeline.routing import unknown_targets
from notifier.tasks_spec import DISPATCH, DISPATCH_QUEUE, Publisher

log = logging.getLogger("notifier.intake")


@dataclass(frozen=True)
class Accepted:
    transaction_id: str
    suppressed: bool = False  # a duplicate of an earlier transaction: nothing new is sent


def body_hash(event: Event) -> str:
    canonical = json.dumps(event.to_json(), sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def validate(settings: Settings, event: Event) -> None:
    unknown = unknown_targets(settings, event.to)
    if unknown:
        raise InvalidEvent(f"to: unknown recipient or group {', '.join(map(repr, unknown))}")
    bad = [c for c in event.channels if c not in settings.channels]
    if bad:
        known = ", ".join(sorted(settings.channels))
        raise InvalidEvent(f"channels: unknown channel {', '.join(map(repr, bad))} (configured: {known})")


class Intake:
    def __init__(self, settings: Settings, ledger: Ledger, publisher: Publisher, metrics: Metrics) -> None:
        self.settings = settings
        self.ledger = ledger
        self.publisher = publisher
        self.metrics = metrics

    def submit(self, event: Event, source: Source, *, receiver: str = "",
               dedup_key: str | None = None, idempotency_key: str | None = None) -> Accepted:
        validate(self.settings, event)
        idem = hashlib.sha256(idempotency_key.encode()).hexdigest() if idempotency_key else None
        try:
            result = self.ledger.accept(
                new_transaction_id(), event, source, receiver=receiver, dedup_key=dedup_key,
                dedup_window=self.settings.dedup_window, idempotency_key=idem,
                idempotency_ttl=self.settings.idempotency_ttl, body_hash=body_hash(event),
            )
        except redis.RedisError as exc:
            raise BrokerUnavailable(f"redis unavailable: {type(exc).__name__}") from None
        if result.outcome is AcceptOutcome.CONFLICT:
            raise IdempotencyConflict(
                f"Idempotency-Key was already used with a different body (transaction "
                f"{result.transaction_id})"
            )
        if result.outcome is not AcceptOutcome.NEW:
            return Accepted(result.transaction_id, suppressed=result.outcome is AcceptOutcome.DUPLICATE)
        # Stored; if publishing fails the outbox sweep publishes it later, and a retry by the
        # sender is answered from the dedup/idempotency key, so the 503 loses nothing.
        self.publisher.publish(DISPATCH, [result.transaction_id], DISPATCH_QUEUE)
        log.info("accepted %s event from %s", event.kind, source.value,
                 extra={"transaction_id": result.transaction_id})
        # Published: the sweep looks again only if it is still not fanned out by then.
        with contextlib.suppress(redis.RedisError):
            self.ledger.outbox_expect(result.transaction_id, self.settings.reaper_after)
        return Accepted(result.transaction_id)
