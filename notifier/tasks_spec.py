"""Task names and queues: the only thing the API, client and scheduler know of the worker."""

from __future__ import annotations

from typing import Protocol

DISPATCH = "notifier.dispatch"
DELIVER = "notifier.deliver"
DIGEST = "notifier.digest"  # merge what a recipient limit held back into one message
TIMER = "notifier.timer"  # a due timer of another subsystem (drill deadlines, ...)

DISPATCH_QUEUE = "notifier.dispatch"
CONTROL_QUEUE = "notifier.control"
CHANNEL_QUEUES = {"sms": "notifier.sms", "email": "notifier.email", "push": "notifier.push"}
ALL_QUEUES = (DISPATCH_QUEUE, CONTROL_QUEUE, *CHANNEL_QUEUES.values())


def deliver_queue(channel: str) -> str:
    return CHANNEL_QUEUES.get(channel, CONTROL_QUEUE)


class Publisher(Protocol):
    """Puts a task on the broker; raises `BrokerUnavailable` when it cannot."""

    def publish(self, task: str, args: list[str], queue: str) -> None: ...

# Receipts and drills (issue 4): no arguments, they work off Redis inboxes/indexes.
APPLY_RECEIPTS = "notifier.apply_receipts"
APPLY_REPLIES = "notifier.apply_replies"
RECONCILE = "notifier.reconcile"
