"""A transaction's status from its deliveries (and a digest's members' from the digest)."""

from __future__ import annotations

from collections.abc import Sequence

from redis.client import Pipeline

from notifier.ledger import DeliveryRecord, Ledger
from notifier.models import DeliveryStatus, TxStatus


def transaction_status(deliveries: Sequence[DeliveryRecord]) -> TxStatus:
    return status_of([d.status for d in deliveries])


def status_of(statuses: Sequence[str]) -> TxStatus:
    """`dispatching` while any delivery is open; then delivered / partial / failed.

    A fallen-back delivery is judged by the one that carried it on; a delivery merged into a
    digest counts as reached when the digest went out (the digest is judged on its own).
    """
    if not statuses:
        return TxStatus.FAILED
    states = [DeliveryStatus(s) for s in statuses]
    if any(not s.terminal for s in states):
        return TxStatus.DISPATCHING
    leaves = [s for s in states if s is not DeliveryStatus.FALLEN_BACK]
    reached = [s for s in leaves if s.succeeded or s is DeliveryStatus.SUPPRESSED]
    if len(reached) == len(leaves):
        return TxStatus.DELIVERED
    return TxStatus.PARTIAL if reached else TxStatus.FAILED


def finish_transaction(ledger: Ledger, txid: str, *, close: Sequence[str] = (),
                       into: Pipeline | None = None) -> TxStatus | None:
    """Roll up `txid`; the call that gives it a new verdict counts it (and dead-letters a
    failure, or takes a failure that turned delivered or partial off the dead letters), and the
    rolled-up deliveries `close` leave the reaper's open index in the same write.

    One script decides (by `status_of`'s rule) and writes, atomically. `into`: queue it last on
    the pipeline of the step's own writes (one round trip for both); returns None then.
    Idempotent, so a redelivered task or the reaper may call it again after a crash.
    """
    done = ledger.roll_up(txid, close, into=into)
    return None if done is None else done[0]


def finish_digest(ledger: Ledger, digest: DeliveryRecord, reached: bool) -> None:
    """A digest ended (sent, delivered: `reached`; failed): settle the members still merged into
    it, roll up their transactions, then its own, which takes it and them off the open index.
    That comes last so that a worker killed anywhere in between leaves the digest open: the
    reaper (or the redelivered task) then does it all again, each step being idempotent."""
    verdict = _digest_verdict(ledger, digest, reached)
    if verdict is None:  # another copy of it (to another address) is still on its way: it decides
        finish_transaction(ledger, digest.transaction_id, close=[digest.id])
        return
    status = DeliveryStatus.SUPPRESSED if verdict else DeliveryStatus.FAILED
    for txid in ledger.settle_merged(digest.digest_of, status):
        if txid != digest.transaction_id:
            finish_transaction(ledger, txid)
    finish_transaction(ledger, digest.transaction_id, close=[digest.id, *digest.digest_of])


def digest_copies(ledger: Ledger, digest: DeliveryRecord) -> list[DeliveryRecord]:
    """The other deliveries carrying the same members: the digest's fallbacks (one per address
    of each channel it went on to), and theirs."""
    members = set(digest.digest_of)
    return [d for d in ledger.deliveries(digest.transaction_id)
            if d.id != digest.id and set(d.digest_of) == members]


def _digest_verdict(ledger: Ledger, digest: DeliveryRecord, reached: bool) -> bool | None:
    """Did the digest's members reach the person: True once any copy of the digest did (a
    fallback makes one per address, to two push tokens say), False once every copy failed, None
    while one is still on its way. Each copy writes its own status before asking, so of two
    ending at once at least one sees both ended."""
    if reached:
        return True
    copies = [DeliveryStatus(d.status) for d in digest_copies(ledger, digest)]
    if any(s.succeeded for s in copies):
        return True
    # A fallen-back copy is terminal, and its own successors are copies too: they decide.
    return None if any(not s.terminal for s in copies) else False


def finish_final(ledger: Ledger, rec: DeliveryRecord) -> None:
    """Roll up after a delivery found final by a redelivered task or the reaper: its worker may
    have died before doing it."""
    status = DeliveryStatus(rec.status)
    # A fallen-back digest's members are its successor's to settle.
    if rec.digest_of and status is not DeliveryStatus.FALLEN_BACK:
        finish_digest(ledger, rec, reached=status.succeeded)
    else:
        finish_transaction(ledger, rec.transaction_id, close=[rec.id])
