"""Reading the ledger's rows: a script's flat replies into records, and history lines."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from notifier.models import TxStatus
from notifier.records import ClaimResult, DeliveryRecord, Fields, TransactionRecord, text
from notifier.sources import stored_event

log = logging.getLogger("notifier.ledger")


@dataclass(frozen=True)
class Claim:
    """A claim's answer; `delivery` (as claimed) and `transaction` come back with the claim so
    the claimer reads nothing again (`transaction` only when asked for)."""

    result: ClaimResult
    delivery: DeliveryRecord | None = None
    transaction: TransactionRecord | Unreadable | None = None


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


# What reading a damaged or foreign row can raise: pydantic's and JSON's ValueErrors, UTF-8, a
# missing field, a field of the wrong shape, JSON nested past the recursion limit.
UNREADABLE_ERRORS = (ValueError, LookupError, TypeError, AttributeError, RecursionError)


def transaction_or_unreadable(raw: Fields) -> TransactionRecord | Unreadable | None:
    """transaction_from, for a reader that must go on with the other transactions it reads, or
    show the damaged one. Each one is logged with its traceback: the cause may as well be a bug
    in reading as damage, and the log says which."""
    try:
        tx = transaction_from(raw)
        if tx is not None:
            TxStatus(tx.status)  # a garbled status is as unreadable as a garbled event
        return tx
    except UNREADABLE_ERRORS as exc:
        legible = {_legible(k): _legible(v) for k, v in raw.items()}
        log.error("transaction %s cannot be read", legible.get("id", "?"), exc_info=True,
                  extra={"transaction_id": legible.get("id")})
        return Unreadable(type(exc).__name__, legible.get("status") or "unknown",
                          legible.get("source") or "unknown")


def _legible(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def delivery_from(raw: Fields) -> DeliveryRecord | None:
    return DeliveryRecord.from_redis(raw) if raw and b"transaction_id" in raw else None


def deliveries_from(rows: Sequence[Sequence[Any]]) -> list[DeliveryRecord]:
    return [DeliveryRecord.from_redis(pairs(row)) for row in rows if row]


def rolled_up(reply: Sequence[Any]) -> tuple[TxStatus, bool]:
    """The roll-up script's reply: the status it wrote, and whether that was a new verdict."""
    return TxStatus(text(reply[0])), bool(int(reply[1]))
