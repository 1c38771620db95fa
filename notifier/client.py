"""`notify(event)`: hand an event to the fleet through the broker, no HTTP hop.

    from notifier import notify
    txid = notify({"title": "DiskFull on db-1", "severity": "critical"}, idempotency_key="k1")

`notify()` retries a lost connection or a timeout itself (ATTEMPTS tries, with backoff), always
under one idempotency key (yours, or one it makes), so a try whose answer was lost and a retry
that got through are one transaction, not two pages. When every try failed it raises:

- `BrokerUnavailable` (itself): no try reached Redis; nothing was accepted, send it again.
- `AcceptOutcomeUnknown` (a BrokerUnavailable): a try reached Redis but its answer was lost;
  the event may have been accepted. Send it again with `exc.idempotency_key` (a stored event
  then answers with its transaction); without that key a retry may page twice.

It also raises `InvalidEvent` for a bad event and `IdempotencyConflict` when the key was used
with another body.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from pydantic import ValidationError

from notifier.config import Settings, load_settings
from notifier.errors import AcceptOutcomeUnknown, BrokerUnavailable, InvalidEvent
from notifier.intake import Accepted, Intake
from notifier.ledger import Ledger
from notifier.models import Event, Source
from notifier.redis_conn import connect
from notifier.schemas import EventIn
from notifier.sources import from_event_in

# Tries of one accept, and the wait before the second (doubled for each further one, less a
# random part so that clients that failed together do not retry together). With the 5 s
# socket timeout, a Redis that never answers costs a caller about 16 s, not forever.
ATTEMPTS = 3
FIRST_BACKOFF = 0.25


@lru_cache(maxsize=8)
def _intake(config_path: str | None) -> Intake:
    return intake_for(load_settings(config_path))


def intake_for(settings: Settings, *, socket_timeout: float = 5.0) -> Intake:
    client = connect(settings.redis_url, settings.redis_sentinel_master, socket_connect_timeout=2,
                     socket_timeout=socket_timeout)
    return Intake(settings, Ledger(client, settings.retention))


def as_event(event: Event | Mapping[str, Any]) -> Event:
    if isinstance(event, Event):
        return event
    try:
        return from_event_in(EventIn.model_validate(dict(event)))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise InvalidEvent(problems) from None


def submit_retrying(intake: Intake, event: Event, idempotency_key: str | None = None) -> Accepted:
    """Accept `event` from the client (notify(), `notifier send`), retrying as the module says.

    Without a key of the caller's, one is made: it costs an `ntf:idem:` key in Redis for
    `idempotency_ttl`, and is what makes the retry of a try whose answer was lost safe."""
    key = idempotency_key or f"notify-{uuid.uuid4().hex}"
    unknown: AcceptOutcomeUnknown | None = None  # set once a try may have stored the event
    failure: BrokerUnavailable | None = None
    for attempt in range(ATTEMPTS):
        if attempt:
            time.sleep(FIRST_BACKOFF * 2 ** (attempt - 1) * random.uniform(0.5, 1.0))
        try:
            intake.ping()
        except BrokerUnavailable as exc:  # this try sent nothing
            failure = unknown or exc
            continue
        try:
            return intake.submit(event, Source.CLIENT, idempotency_key=key)
        except AcceptOutcomeUnknown as exc:
            failure = unknown = exc
        except BrokerUnavailable:
            # An error reply (a failing script, Redis out of memory): not retried, it would be
            # the same; but an earlier try may still have stored the event.
            if unknown is not None:
                raise unknown from None
            raise
    assert failure is not None  # every try that did not return set it
    raise failure


def notify(event: Event | Mapping[str, Any], idempotency_key: str | None = None, *,
           config: str | None = None) -> str:
    """Accept `event` durably and return its transaction ID (see the module for the retries and
    the errors). A retry of an event whose first try was stored returns the first's ID."""
    return submit_retrying(_intake(config), as_event(event), idempotency_key).transaction_id
