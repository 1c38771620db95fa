"""Jobs the scheduler leader runs every few seconds, besides firing timers.

Work that needs the providers or the pipeline (applying receipts and replies, asking Aliyun
about missing receipts) runs in the workers: these jobs only notice that some is due and
publish one task for it. A "kick" key keeps at most one such task waiting per kind, so a fleet
without workers does not pile up thousands of them; the task clears the key when it starts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import redis

from notifier import awaiting
from notifier.channels.sandbox import push_reports
from notifier.config import SandboxProvider, Settings
from notifier.drills.replies import reply_inbox
from notifier.inbox import Inbox
from notifier.ledger import Ledger
from notifier.receipts import receipt_inbox
from notifier.tasks_spec import (
    APPLY_RECEIPTS,
    APPLY_REPLIES,
    CONTROL_QUEUE,
    DISPATCH,
    DISPATCH_QUEUE,
    RECONCILE,
    Publisher,
)

Job = tuple[float, Callable[[], None]]  # (every N seconds, job)
KICK_PREFIX = "ntf:kick:"
# A kicked task that never started is taken as lost (kicked again) after this, once the
# control queue is empty: while the queue holds tasks it is still waiting among them.
KICK_TTL = 15
log = logging.getLogger(__name__)


def kick_key(task: str) -> str:
    return KICK_PREFIX + task


def clear_kick(client: redis.Redis, task: str) -> None:
    """Called by the task as it starts: work arriving from now on needs a new kick."""
    client.delete(kick_key(task))


def kick(client: redis.Redis, publisher: Publisher, task: str) -> bool:
    key = kick_key(task)
    if not client.set(key, "1", nx=True, ex=KICK_TTL):
        if client.llen(CONTROL_QUEUE):  # no worker, or a backlog: the kicked one still waits
            client.expire(key, KICK_TTL)  # (a no-op if its task started meanwhile)
        return False
    try:
        publisher.publish(task, [], CONTROL_QUEUE)
    except Exception:
        client.delete(key)  # nothing is waiting: the next look kicks it
        raise
    return True


def sandbox_reports_wanted(settings: Settings) -> bool:
    sms = settings.channels.get("sms")
    return sms is not None and any(isinstance(p, SandboxProvider) and p.report_url
                                   for p in sms.providers)


def periodic_jobs(settings: Settings, client: redis.Redis, publisher: Publisher) -> list[Job]:
    ledger = Ledger(client, settings.retention)
    receipts: Inbox = receipt_inbox(client, settings.retention)
    replies: Inbox = reply_inbox(client, settings.retention)

    def sweep_outbox() -> None:
        """Re-publish accepted transactions still not fanned out `reaper_after` after they were
        accepted (the accept script queued their dispatch task, so it was lost somehow); each at
        most once per `reaper_after`, so a deep but healthy backlog is not multiplied."""
        for txid in ledger.outbox_older_than(5.0):
            publisher.publish(DISPATCH, [txid], DISPATCH_QUEUE)
            ledger.outbox_expect(txid, settings.reaper_after)

    def apply_inboxes() -> None:
        """Receipts and replies stored but not applied: early receipts due for another try, or
        pushes whose task publish failed after they were stored."""
        if receipts.due():
            kick(client, publisher, APPLY_RECEIPTS)
        if replies.due():
            kick(client, publisher, APPLY_REPLIES)

    def reconcile() -> None:
        """SMS without a receipt after `reconcile_after`: have a worker ask the provider."""
        if awaiting.has_overdue(client, time.time() - settings.reconcile_after):
            kick(client, publisher, RECONCILE)

    def sandbox_reports() -> None:
        push_reports(client)

    def trim_dead_letters() -> None:
        ledger.trim_dead_letters()

    jobs: list[Job] = [(2.0, sweep_outbox), (1.0, apply_inboxes),
                       (min(max(settings.reconcile_after / 4, 1.0), 30.0), reconcile),
                       (60.0, trim_dead_letters)]
    if sandbox_reports_wanted(settings):
        jobs.append((0.25, sandbox_reports))
    return jobs
