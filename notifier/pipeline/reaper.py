"""Re-queue deliveries whose task was lost with a worker (SIGKILL, OOM, host loss).

Celery on Redis only restores a dead worker's reserved messages after the visibility timeout;
the ledger knows sooner. A delivery that has not moved for `stale_after` gets its deliver task
published again. The claim token turns the extra task into a no-op when the original holder is
alive, and the maybe-sent look-up guards a send that was in flight when the holder died.

The open index is scored by each delivery's last sign of life, and a sweep reads only the
entries older than `stale_after`. One the reaper looks at and leaves (waiting on a timer, held
in a digest, a claim still within its lease) is re-scored to when it next needs a look, so
it leaves the front of the index: a storm of waiting deliveries costs a read each per timer,
not per sweep, and never hides a lost one behind them. A sweep reads pages of `page` entries,
at most `max_pages` of them (one round trip per page to read, one to re-score), so its cost
stays bounded when very many are due at once; the rest are the oldest at the next sweep.

A queued delivery (its task published, never claimed) whose channel queue still holds tasks is
most likely waiting in that backlog: a copy would only join the end of the same queue and be a
no-op, and copying a deep backlog every `stale_after` multiplies the work the fleet must get
through. It is taken as lost only once its queue is empty, or after BACKLOG_PERIODS ×
`stale_after` (a task lost from a queue that never empties still goes again).
"""

from __future__ import annotations

import time

from notifier.ledger import DeliveryRecord, Ledger
from notifier.models import DeliveryStatus
from notifier.pipeline.rollup import digest_copies, finish_final
from notifier.tasks_spec import CHANNEL_QUEUES, CONTROL_QUEUE, DELIVER, Publisher, deliver_queue

PAGE, MAX_PAGES = 500, 20
# As long as a reserved message of a dead worker takes to come back by itself (Celery's
# visibility timeout, 300 s, against the default reaper_after of 60 s).
BACKLOG_PERIODS = 5


def reap(ledger: Ledger, publisher: Publisher, *, stale_after: float, lease: float,
         page: int = PAGE, max_pages: int = MAX_PAGES) -> list[str]:
    """One sweep; returns the deliveries it re-queued."""
    now = time.time()
    cutoff = now - stale_after  # fixed for the sweep: what it handles moves past it
    requeued: list[str] = []
    seen: set[str] = set()  # an entry scored exactly at the cutoff stays in range: once only
    backlogged: set[str] | None = None  # the delivery queues holding tasks, read once per sweep
    for _ in range(max_pages):
        due = [(did, score) for did, score in ledger.open_due(cutoff, page) if did not in seen]
        if not due:
            break
        seen.update(did for did, _ in due)
        if backlogged is None:
            backlogged = _backlogged(ledger)
        requeued += _sweep_page(ledger, publisher, due, now=now, stale_after=stale_after,
                                lease=lease, backlogged=backlogged)
    return requeued


def _backlogged(ledger: Ledger) -> set[str]:
    """The delivery queues that hold tasks (the broker is the ledger's Redis), in one round trip."""
    queues = [*CHANNEL_QUEUES.values(), CONTROL_QUEUE]
    pipe = ledger.redis.pipeline(transaction=False)
    for queue in queues:
        pipe.llen(queue)
    return {queue for queue, depth in zip(queues, pipe.execute(), strict=True) if depth}


def _sweep_page(ledger: Ledger, publisher: Publisher, due: list[tuple[str, float]], *,
                now: float, stale_after: float, lease: float, backlogged: set[str]) -> list[str]:
    """Requeue the page's stuck deliveries, roll up the finished ones, re-score the rest."""
    requeued: list[str] = []
    moves: list[tuple[str, float, float]] = []
    digests: dict[str, bool] = {}
    for (did, score), rec in zip(due, ledger.deliveries_by_id([d for d, _ in due]), strict=True):
        if rec is None:
            ledger.close_open(did)
            continue
        if DeliveryStatus(rec.status).terminal:  # its worker died before the roll-up (a digest:
            finish_final(ledger, rec)            # before settling its members too)
            continue
        if rec.digest_id and _stranded_in_digest(ledger, publisher, rec, digests):
            requeued.append(did)
            continue
        since = _alive_since(rec, now=now, stale_after=stale_after, lease=lease)
        waiting = rec.status == DeliveryStatus.QUEUED and deliver_queue(rec.channel) in backlogged
        if now - since > stale_after * (BACKLOG_PERIODS if waiting else 1):
            _requeue(ledger, publisher, rec)
            requeued.append(did)
        else:  # (one waiting in a backlog: looked at again next period, its queue may be empty)
            moves.append((did, score, now if waiting else since))
    ledger.rescore_open(moves)
    return requeued


def _stranded_in_digest(ledger: Ledger, publisher: Publisher, rec: DeliveryRecord,
                        digests: dict[str, bool]) -> bool:
    """A delivery merged into a digest waits for the digest to settle it, unless the digest no
    longer can: it is gone, or it fell back without a copy carrying its members (a version before
    7ea2f2a marked a refused digest "carried by" another delivery and left them), or it ended
    and its own recovery already ran. Released (sent on its own way) or settled here then;
    True when released. `digests`: this sweep's answer per digest (whether its members are
    stranded), so a page of its members costs one look at it."""
    if rec.digest_id not in digests:
        digests[rec.digest_id] = _digest_cannot_settle(ledger, rec.digest_id)
    if not digests[rec.digest_id]:
        return False
    ledger.update(rec.id, digest_id=None)
    ledger.log(rec.transaction_id, "released", delivery=rec.id, digest=rec.digest_id,
               reason="its digest can no longer carry it")
    _requeue(ledger, publisher, rec)
    return True


def _digest_cannot_settle(ledger: Ledger, digest_id: str) -> bool:
    digest = ledger.delivery(digest_id)
    if digest is None:
        return True
    status = DeliveryStatus(digest.status)
    if status is DeliveryStatus.FALLEN_BACK:  # its copies carry its members on, if it made any
        return not digest_copies(ledger, digest)
    if status.terminal:
        finish_final(ledger, digest)  # ended without settling them: idempotent, so again
    return False


def _requeue(ledger: Ledger, publisher: Publisher, rec: DeliveryRecord) -> None:
    publisher.publish(DELIVER, [rec.id], deliver_queue(rec.channel))
    if rec.status == DeliveryStatus.QUEUED:
        # Its copy is a sign of life: a queued delivery counts its wait from here, so one still
        # behind a backlog is copied once per BACKLOG_PERIODS, not once per sweep after that.
        ledger.update(rec.id)
    ledger.touch_open(rec.id)
    ledger.log(rec.transaction_id, "requeued", delivery=rec.id, status=rec.status)


def _alive_since(rec: DeliveryRecord, *, now: float, stale_after: float, lease: float) -> float:
    """The delivery's last sign of life, for an open one: stuck once older than `stale_after`,
    else the score it is looked at again by."""
    status = DeliveryStatus(rec.status)
    if rec.digest_id:  # a digest carries it now; it is settled with the digest
        return now
    if status is DeliveryStatus.SENDING:  # stuck once its claim is older than the lease
        return (rec.claim_at or 0.0) + lease - stale_after
    if status in (DeliveryStatus.RETRYING, DeliveryStatus.DEFERRED):
        # Waiting on a timer (or a digest): only stuck if that timer is overdue.
        return rec.next_at if rec.next_at is not None else now
    return rec.updated_at
