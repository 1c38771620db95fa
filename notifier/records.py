"""What the ledger stores: transactions, deliveries, attempts, and the answers of its scripts."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any, NamedTuple

from notifier.models import DeliveryStatus, Event

Fields = Mapping[Any, Any]  # redis-py types replies as bytes | str; ours are always bytes


def text(value: object) -> str:
    """A Redis reply (bytes here, since clients don't decode) as str."""
    return value.decode() if isinstance(value, bytes) else str(value)


class AcceptOutcome(StrEnum):
    NEW = "new"
    DUPLICATE = "duplicate"  # same Alertmanager group content within the window
    REPLAY = "replay"  # same idempotency key, same body
    CONFLICT = "conflict"  # same idempotency key, other body


class AcceptResult(NamedTuple):  # one per webhook: a tuple is cheaper than a frozen dataclass
    outcome: AcceptOutcome
    transaction_id: str


@dataclass
class TransactionRecord:
    id: str
    source: str
    status: str
    event: Event
    created_at: float
    updated_at: float
    finished_at: float | None = None
    receiver: str = ""
    suppressed_count: int = 0


@dataclass
class DeliveryRecord:
    id: str
    transaction_id: str
    channel: str
    recipient: str
    address: str
    kind: str
    status: str = DeliveryStatus.QUEUED
    attempt: int = 0
    provider_index: int = 0  # which of the channel's providers is being tried
    created_at: float = 0.0
    updated_at: float = 0.0
    next_at: float | None = None
    fallback_of: str = ""
    fallback_chain: list[str] = field(default_factory=list)  # channels still to try after this
    provider: str = ""
    provider_message_id: str = ""
    request_id: str = ""
    error_code: str = ""
    error_class: str = ""
    reason: str = ""
    digest_id: str = ""  # on a delivery merged into a digest: the digest that carries it
    digest_of: list[str] = field(default_factory=list)  # on a digest: the deliveries it carries
    sent_at: float | None = None
    delivered_at: float | None = None
    claim_token: str = ""
    claim_at: float | None = None
    maybe_sent_at: float | None = None  # a send timed out after leaving: look it up first
    # Retries ran out on a maybe-sent: one more claim only looks it up on the same provider,
    # and if it is not found moves on (next provider or channel) for this reason.
    after_lookup: str = ""
    # The provider's OutId of its last send together with other recipients (one request for
    # several numbers): a look-up or a receipt finds it under that id, not under its own.
    sent_as: str = ""

    def to_redis(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for f in fields(self):  # not asdict(): it deep-copies, on every delivery written
            value = getattr(self, f.name)
            if value is None:
                continue
            out[f.name] = json.dumps(value) if isinstance(value, list) else str(value)
        return out

    @classmethod
    def from_redis(cls, raw: Fields) -> DeliveryRecord:
        data = {text(k): text(v) for k, v in raw.items()}
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in data:
                continue
            value = data[f.name]
            if f.name in ("fallback_chain", "digest_of"):
                kwargs[f.name] = json.loads(value)
            elif f.name in ("attempt", "provider_index"):
                kwargs[f.name] = int(value)
            elif f.name in _FLOAT_FIELDS:
                kwargs[f.name] = float(value)
            else:
                kwargs[f.name] = value
        return cls(**kwargs)


@dataclass(frozen=True)
class Attempt:
    at: float
    provider: str
    outcome: str  # sent, transient, maybe_sent, permanent, account, recipient_budget, deferred,
    # circuit_open, found_after_timeout, not_found_after_timeout, receipt, digest ...
    error_code: str = ""
    message: str = ""
    provider_message_id: str = ""
    latency_ms: float | None = None
    retry_at: float | None = None


class ClaimResult(StrEnum):
    CLAIMED = "claimed"
    RECLAIMED = "reclaimed"  # the previous holder vanished mid-send: the provider may have it
    BUSY = "busy"  # someone else holds a fresh claim
    DONE = "done"  # already terminal
    MERGED = "merged"  # waiting in a digest, which sends it
    MISSING = "missing"


_FLOAT_FIELDS = ("created_at", "updated_at", "next_at", "sent_at", "delivered_at", "claim_at",
                 "maybe_sent_at")
