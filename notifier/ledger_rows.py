"""Reading the ledger's rows: a script's flat replies into records, and history lines."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from notifier.models import TxStatus
from notifier.records import ClaimResult, DeliveryRecord, Fields, TransactionRecord, text
from notifier.sources import stored_event


@dataclass(frozen=True)
class Claim:
    """A claim's answer; `delivery` (as claimed) and `transaction` come back with the claim so
    the claimer reads nothing again (`transaction` only when asked for)."""

    result: ClaimResult
    delivery: DeliveryRecord | None = None
    transaction: TransactionRecord | None = None


def entry(at: float, what: str, detail: Mapping[str, str]) -> str:
    """One history line (the transaction's log), as `history()` reads it back."""
    return json.dumps({"at": at, "event": what, **detail}, ensure_ascii=False)


def pairs(flat: Sequence[Any]) -> dict[Any, Any]:
    """A script's HGETALL reply (a flat list) as the dict redis-py's HGETALL returns."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


def transaction_from(raw: Fields) -> TransactionRecord | None:
    if not raw:
        return None
    data = {text(k): text(v) for k, v in raw.items()}
    return TransactionRecord(
        id=data["id"],
        source=data["source"],
        status=data["status"],
        event=stored_event(data),
        created_at=float(data["created_at"]),
        updated_at=float(data["updated_at"]),
        finished_at=float(data["finished_at"]) if "finished_at" in data else None,
        receiver=data.get("receiver", ""),
        suppressed_count=int(data.get("suppressed_count", "0")),
    )


@dataclass(frozen=True)
class Unreadable:
    """A stored transaction that cannot be read back (its event no longer validates, a field is
    missing or garbled): what went wrong, by name only, and its status and source as far as
    they are legible."""

    error: str
    status: str
    source: str

    @property
    def detail(self) -> str:
        return f"its stored event cannot be read ({self.error})"


def transaction_or_unreadable(raw: Fields) -> TransactionRecord | Unreadable | None:
    """transaction_from, for a reader that must go on with the other transactions it reads, or
    show the damaged one."""
    try:
        return transaction_from(raw)
    except (ValueError, KeyError, TypeError) as exc:  # ValueError: pydantic's, JSON, UTF-8
        legible = {_legible(k): _legible(v) for k, v in raw.items()}
        return Unreadable(type(exc).__name__, legible.get("status") or "unknown",
                          legible.get("source") or "unknown")


def _legible(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def delivery_from(raw: Fields) -> DeliveryRecord | None:
    return DeliveryRecord.from_redis(raw) if raw and b"transaction_id" in raw else None


def deliveries_from(rows: Sequence[Sequence[Any]]) -> list[DeliveryRecord]:
    return [DeliveryRecord.from_redis(pairs(row)) for row in rows if row]


def rolled_up(reply: Sequence[Any]) -> tuple[TxStatus, bool]:
    """The roll-up script's reply: the status it wrote, and whether it first made it final."""
    return TxStatus(text(reply[0])), bool(int(reply[1]))
