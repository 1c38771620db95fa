"""notifier: multi-channel alerting over SMS, email and push, on a Celery fleet with Redis."""

from notifier.client import notify
from notifier.errors import AcceptOutcomeUnknown, BrokerUnavailable, IdempotencyConflict, InvalidEvent
from notifier.models import Alert, Event

__all__ = ["AcceptOutcomeUnknown", "Alert", "BrokerUnavailable", "Event", "IdempotencyConflict",
           "InvalidEvent", "notify"]
__version__ = "0.1.0"
