"""JSON views of ledger records for the API and `notifier status --json` (no secrets stored)."""

from __future__ import annotations

from typing import Any

from notifier.ledger import Ledger, TransactionRecord
from notifier.ledger_rows import UNREADABLE_ERRORS, Unreadable


def transaction_view(ledger: Ledger, txid: str) -> dict[str, Any] | None:
    tx = ledger.transaction_or_unreadable(txid)
    if tx is None:
        return None
    deliveries = ledger.deliveries(txid)
    attempts = ledger.attempts_of(d.id for d in deliveries)
    return {
        **(_unreadable(txid, tx) if isinstance(tx, Unreadable) else _readable(tx)),
        "deliveries": [
            {
                "delivery_id": d.id,
                "channel": d.channel,
                "provider": d.provider or None,
                "recipient": d.recipient,
                "address": d.address,
                "status": d.status,
                "attempt": d.attempt,
                "fallback_of": d.fallback_of or None,
                "fallback_chain": d.fallback_chain,
                "reason": d.reason or None,
                "error_code": d.error_code or None,
                "error_class": d.error_class or None,
                "provider_message_id": d.provider_message_id or None,
                # The OutId of a request that carried several deliveries (Aliyun console, receipts)
                "sent_as": d.sent_as or None,
                "request_id": d.request_id or None,
                "digest_id": d.digest_id or None,
                "next_at": d.next_at,
                "sent_at": d.sent_at,
                "delivered_at": d.delivered_at,
                "attempts": attempts.get(d.id, []),
            }
            for d in deliveries
        ],
        "history": _history(ledger, txid, tx),
    }


def _readable(tx: TransactionRecord) -> dict[str, Any]:
    return {
        "transaction_id": tx.id,
        "status": tx.status,
        "source": tx.source,
        "receiver": tx.receiver or None,
        "created_at": tx.created_at,
        "updated_at": tx.updated_at,
        "finished_at": tx.finished_at,
        "suppressed_duplicates": tx.suppressed_count,
        "event": tx.event.to_json(),
    }


def _unreadable(txid: str, tx: Unreadable) -> dict[str, Any]:
    # Damaged, or stored by a version whose schema this one no longer reads: show what it is
    # (its deliveries and history follow as usual) rather than fail the whole view.
    return {"transaction_id": txid, "status": tx.status, "source": tx.source, "receiver": None,
            "created_at": None, "updated_at": None, "finished_at": None,
            "suppressed_duplicates": 0, "event": None, "event_error": tx.detail}


def _history(ledger: Ledger, txid: str, tx: TransactionRecord | Unreadable) -> list[dict[str, Any]]:
    try:
        return ledger.history(txid)
    except UNREADABLE_ERRORS:
        if not isinstance(tx, Unreadable):
            raise
        return []  # the row's own fields are damaged too: nothing legible to show
