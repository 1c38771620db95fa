"""notifier: multi-channel alerting over SMS, email and push, on a Celery fleet with Redis."""

from notifier.models import Alert, Event

__all__ = ["Alert", "Event"]
__version__ = "0.1.0"
