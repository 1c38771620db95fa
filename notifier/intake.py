"""Accepting an event: validate, then store it and queue its dispatch task in one script.

The API, the Alertmanager adapter and `notify()` all come through here. A caller is told
"accepted" only once the transaction and its dispatch task are in Redis: both are written by
one Lua script (notifier.ledger_accept), so there is no state where one exists without the
other. The outbox entry stays as a safety net: the scheduler re-publishes a transaction that
is still not fanned out long after its acceptance.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import NamedTuple

import redis

from notifier.config import Settings
from notifier.errors import AcceptOutcomeUnknown, BrokerUnavailable, IdempotencyConflict, InvalidEvent
from notifier.ids import new_transaction_id
from notifier.ledger import AcceptOutcome, AcceptResult, Ledger
from notifier.ledger_accept import (
    AcceptCall,
    AcceptPolicy,
    ScriptCall,
    accept_call,
    accept_results,
    event_json,
    script_call,
    webhook_body,
)
from notifier.logs import log_lines
from notifier.models import Event, Source
from notifier.pipeline.routing import unknown_targets
from notifier.schemas import WebhookFields
from notifier.sources import alertmanager_kind, alertmanager_receiver

log = logging.getLogger("notifier.intake")


class Accepted(NamedTuple):  # one per webhook: a tuple is built in a fifth of a dataclass's time
    transaction_id: str
    suppressed: bool = False  # a duplicate of an earlier transaction: nothing new is sent


def body_hash(event: Event) -> str:
    canonical = json.dumps(event.to_json(), sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


# Kinds only notifier itself creates, refused from outside senders (the API's /v1/events, the
# client and `notifier send`): an outside `drill` event can never be rendered (every channel's
# drill template needs the reply code a drill puts in `extra`, which EventIn cannot carry), and
# an outside `digest` would pass for a merged digest, which is never held for storm protection.
# Drills submit theirs as Source.DRILL; a replay sends an event that was accepted before.
RESERVED_KINDS = {"drill": "notifier's drill phase messages", "digest": "notifier's storm digests"}
_OUTSIDE = frozenset({Source.API, Source.CLIENT})


def validate(settings: Settings, event: Event, source: Source) -> None:
    if source in _OUTSIDE and event.kind in RESERVED_KINDS:
        raise InvalidEvent(f"kind: {event.kind!r} is reserved for {RESERVED_KINDS[event.kind]}; "
                           f"use another kind (e.g. 'alert')")
    unknown = unknown_targets(settings, event.to)
    if unknown:
        raise InvalidEvent(f"to: unknown recipient or group {', '.join(map(repr, unknown))}")
    bad = [c for c in event.channels if c not in settings.channels]
    if bad:
        known = ", ".join(sorted(settings.channels))
        raise InvalidEvent(f"channels: unknown channel {', '.join(map(repr, bad))} (configured: {known})")


class Intake:
    def __init__(self, settings: Settings, ledger: Ledger) -> None:
        self.settings = settings
        self.ledger = ledger
        self.policy = AcceptPolicy(retention=settings.retention, dedup_window=settings.dedup_window,
                                   idempotency_ttl=settings.idempotency_ttl,
                                   sweep_after=settings.reaper_after)

    def prepare(self, event: Event, source: Source, *, receiver: str = "",
                dedup_key: str | None = None, idempotency_key: str | None = None) -> AcceptCall:
        """Check the event against the config and build its accept script call."""
        validate(self.settings, event, source)
        idem = hashlib.sha256(idempotency_key.encode()).hexdigest() if idempotency_key else None
        return accept_call(new_transaction_id(), event.kind, event_json(event), source,
                           receiver=receiver, dedup_key=dedup_key, idempotency_key=idem,
                           body_hash=body_hash(event) if idem else "")

    def prepare_alertmanager(self, webhook: WebhookFields, body: bytes, dedup_key: str) -> AcceptCall:
        """The accept call of a validated Alertmanager webhook, kept as its body (see
        notifier.ledger_accept.Stored).
        Nothing to check against the config: such an event names no recipients or channels."""
        return accept_call(new_transaction_id(), alertmanager_kind(webhook), webhook_body(body),
                           Source.ALERTMANAGER, receiver=alertmanager_receiver(webhook),
                           dedup_key=dedup_key)

    def script_call(self, calls: Sequence[AcceptCall]) -> ScriptCall:
        """The one accept script call for `calls` (in order), under this intake's policy."""
        return script_call(calls, self.policy)

    def results(self, calls: Sequence[AcceptCall], reply: list[bytes | str]) -> list[AcceptResult]:
        """The accept script's reply to `calls` (the API's batched path): one result each."""
        results = accept_results(reply)
        if len(results) == len(calls):
            self.log_stored(calls, results)
        return results

    def log_stored(self, calls: Sequence[AcceptCall], results: Sequence[AcceptResult]) -> None:
        """A line for each event the script stored, written together (see logs.log_lines)."""
        log_lines(log, logging.INFO, [
            (f"accepted {call.kind} event from {call.source}", {"transaction_id": result.transaction_id})
            for call, result in zip(calls, results, strict=True) if result.outcome is AcceptOutcome.NEW])

    def conclude(self, result: AcceptResult) -> Accepted:
        """What the sender is told, once the accept script answered."""
        if result.outcome is AcceptOutcome.CONFLICT:
            raise IdempotencyConflict(
                f"Idempotency-Key was already used with a different body (transaction "
                f"{result.transaction_id})", result.transaction_id
            )
        return Accepted(result.transaction_id, suppressed=result.outcome is AcceptOutcome.DUPLICATE)

    def submit(self, event: Event, source: Source, *, receiver: str = "",
               dedup_key: str | None = None, idempotency_key: str | None = None,
               idempotency_ttl: float | None = None) -> Accepted:
        """`idempotency_ttl`: how long the key holds, if not `idempotency_ttl` of the config
        (a drill's sends: as long as the drill, which may re-run a step days later)."""
        call = self.prepare(event, source, receiver=receiver, dedup_key=dedup_key,
                            idempotency_key=idempotency_key)
        policy = self.policy if idempotency_ttl is None else replace(
            self.policy, idempotency_ttl=idempotency_ttl)
        with _broker_errors(idempotency_key):
            [result] = self.ledger.accept(script_call([call], policy))
        self.log_stored([call], [result])
        return self.conclude(result)

    def replay(self, event: Event, dead_letter: str, *, receiver: str = "") -> Accepted | None:
        """Accept `event` again as the replay of the dead letter `dead_letter`, which leaves its
        list in the same script (Ledger.accept_replay): a replay that is refused (InvalidEvent,
        before any write) or fails (BrokerUnavailable) leaves it in place. None when it is not
        a dead letter (any more: a concurrent replay took it)."""
        call = self.prepare(event, Source.REPLAY, receiver=receiver)
        with _broker_errors():
            result = self.ledger.accept_replay(self.script_call([call]), dead_letter)
        if result is None:
            return None
        self.log_stored([call], [result])
        return self.conclude(result)


    def ping(self) -> None:
        """BrokerUnavailable unless Redis answers: a failure here sent no event (notify()
        tells "not accepted" from "outcome unknown" by it)."""
        try:
            self.ledger.redis.ping()
        except redis.RedisError as exc:
            raise _unavailable(exc) from None


@contextmanager
def _broker_errors(idempotency_key: str | None = None) -> Iterator[None]:
    """Any Redis failure of an accept, as the sender is told it. A lost connection or a timeout
    may come after Redis ran the script (or before it was sent: redis-py does not say which),
    so its outcome is unknown; an error reply means Redis did not accept it."""
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        again = f" (send it again only with idempotency key {idempotency_key!r})" if idempotency_key else ""
        raise AcceptOutcomeUnknown(f"redis unavailable: {type(exc).__name__}; the event may have "
                                   f"been accepted{again}", idempotency_key) from None
    except redis.RedisError as exc:
        raise _unavailable(exc) from None


def _unavailable(exc: redis.RedisError) -> BrokerUnavailable:
    return BrokerUnavailable(f"redis unavailable: {type(exc).__name__}")  # str(exc) can name the address
