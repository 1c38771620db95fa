"""A transaction's status from its deliveries."""

from __future__ import annotations

from collections.abc import Sequence

from notifier.ledger import DeliveryRecord, Ledger
from notifier.metrics import Metrics
from notifier.models import DeliveryStatus, TxStatus


def transaction_status(deliveries: Sequence[DeliveryRecord]) -> TxStatus:
    """`dispatching` while any delivery is open; then delivered / partial / failed.

    A fallen-back delivery is judged by the one that carried it on; a delivery merged into a
    digest counts as reached when the digest went out (the digest is judged on its own).
    """
    if not deliveries:
        return TxStatus.FAILED
    statuses = [DeliveryStatus(d.status) for d in deliveries]
    if any(not s.terminal for s in statuses):
        return TxStatus.DISPATCHING
    leaves = [s for s in statuses if s is not DeliveryStatus.FALLEN_BACK]
    reached = [s for s in leaves if s.succeeded or s is DeliveryStatus.SUPPRESSED]
    if len(reached) == len(leaves):
        return TxStatus.DELIVERED
    return TxStatus.PARTIAL if reached else TxStatus.FAILED


def finish_transaction(ledger: Ledger, metrics: Metrics, txid: str) -> TxStatus:
    """Roll up `txid`; the first call that makes it final counts it (and dead-letters a failure).

    Idempotent, so a redelivered task or the reaper may call it again after a crash.
    """
    status = transaction_status(ledger.deliveries(txid))
    if ledger.set_status(txid, status):
        metrics.inc("notifier_transactions_finished", status=status.value)
        if status is TxStatus.FAILED:
            ledger.dead_letter(txid)
    return status
