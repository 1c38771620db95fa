"""`notify(event)`: hand an event to the fleet through the broker, no HTTP hop.

    from notifier import notify
    txid = notify({"title": "DiskFull on db-1", "severity": "critical"}, idempotency_key="k1")

Raises `BrokerUnavailable` when Redis cannot be reached (nothing was accepted), `InvalidEvent`
for a bad event, `IdempotencyConflict` when the key was used with another body.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from pydantic import ValidationError

from notifier.config import Settings, load_settings
from notifier.errors import InvalidEvent
from notifier.intake import Intake
from notifier.ledger import Ledger
from notifier.models import Event, Source
from notifier.redis_conn import connect
from notifier.schemas import EventIn
from notifier.sources import from_event_in


@lru_cache(maxsize=8)
def _intake(config_path: str | None) -> Intake:
    return intake_for(load_settings(config_path))


def intake_for(settings: Settings) -> Intake:
    client = connect(settings.redis_url, settings.redis_sentinel_master, socket_connect_timeout=2,
                     socket_timeout=5)
    return Intake(settings, Ledger(client, settings.retention))


def as_event(event: Event | Mapping[str, Any]) -> Event:
    if isinstance(event, Event):
        return event
    try:
        return from_event_in(EventIn.model_validate(dict(event)))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise InvalidEvent(problems) from None


def notify(event: Event | Mapping[str, Any], idempotency_key: str | None = None, *,
           config: str | None = None) -> str:
    """Accept `event` durably and return its transaction ID."""
    return _intake(config).submit(as_event(event), Source.CLIENT,
                                  idempotency_key=idempotency_key).transaction_id
