"""Re-queue deliveries whose task was lost with a worker (SIGKILL, OOM, host loss).

Celery on Redis only restores a dead worker's reserved messages after the visibility timeout;
the ledger knows sooner. A delivery that has not moved for `stale_after` gets its deliver task
published again. The claim token turns the extra task into a no-op when the original holder is
alive, and the maybe-sent look-up guards a send that was in flight when the holder died.
"""

from __future__ import annotations

import time

from notifier.ledger import Ledger
from notifier.models import DeliveryStatus
from notifier.pipeline.rollup import finish_final
from notifier.tasks_spec import DELIVER, Publisher, deliver_queue


def reap(ledger: Ledger, publisher: Publisher, *, stale_after: float, lease: float) -> list[str]:
    now = time.time()
    requeued: list[str] = []
    for did in ledger.open_older_than(stale_after):
        rec = ledger.delivery(did)
        if rec is None:
            ledger.close_open(did)
            continue
        status = DeliveryStatus(rec.status)
        if status.terminal:  # its worker died before rolling up (a digest: settling its members)
            finish_final(ledger, rec)
            continue
        if rec.digest_id:  # a digest carries it: settled with it (above, if its worker died)
            continue
        if status is DeliveryStatus.SENDING:
            stuck = now - (rec.claim_at or 0) > lease
        elif status in (DeliveryStatus.RETRYING, DeliveryStatus.DEFERRED):
            # Waiting on a timer (or a digest): only stuck if that timer is overdue.
            stuck = rec.next_at is not None and now - rec.next_at > stale_after
        else:
            stuck = now - rec.updated_at > stale_after
        if stuck:
            publisher.publish(DELIVER, [did], deliver_queue(rec.channel))
            ledger.touch_open(did)
            ledger.log(rec.transaction_id, "requeued", delivery=did, status=rec.status)
            requeued.append(did)
    return requeued
