"""Jobs the scheduler leader runs every few seconds, besides firing timers."""

from __future__ import annotations

from collections.abc import Callable

import redis

from notifier.config import Settings
from notifier.ledger import Ledger
from notifier.tasks_spec import DISPATCH, DISPATCH_QUEUE, Publisher

Job = tuple[float, Callable[[], None]]  # (every N seconds, job)


def periodic_jobs(settings: Settings, client: redis.Redis, publisher: Publisher) -> list[Job]:
    ledger = Ledger(client, settings.retention)

    def sweep_outbox() -> None:
        """Re-publish accepted transactions whose dispatch task never made it to the broker."""
        for txid in ledger.outbox_older_than(5.0):
            publisher.publish(DISPATCH, [txid], DISPATCH_QUEUE)

    return [(2.0, sweep_outbox)]
