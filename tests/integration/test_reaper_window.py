"""The reaper finds a delivery whose worker died even behind a storm of deliveries that wait
legitimately (deferred by a rate limit, on their timers), and still finds each of those once
its own timer is overdue."""

from __future__ import annotations

import time
from typing import Any

from notifier.models import Event, Source
from notifier.pipeline.dispatch import _fan_out
from notifier.pipeline.reaper import reap
from tests.integration.conftest import MakeFleet
from tests.support.inline import InlineFleet

STORM = 510  # more than one page of the open index (500)


def _storm(make_fleet: MakeFleet, people: int, limit: dict[str, Any]) -> InlineFleet:
    """`people` SMS of one alert, all but the first deferred by the channel's rate limit."""
    cfg: dict[str, Any] = {
        "channels": {"sms": {"provider": "sandbox", "recipient_limits": [], "rate_limit": limit},
                     "email": {"provider": "sandbox"}},
        "recipients": {f"r{i}": {"phone": f"+86138{i:08d}", "email": f"r{i}@example.com"}
                       for i in range(people)},
        "groups": {"all": [f"r{i}" for i in range(people)]},
        "routes": [{"match": {}, "to": ["all"], "channels": ["sms"]}],
    }
    fleet = make_fleet(cfg)
    fleet.intake.submit(Event(kind="alert", title="storm", severity="critical"), Source.API)
    fleet.drain()
    return fleet


def _lost_behind_a_storm(make_fleet: MakeFleet) -> tuple[InlineFleet, str, str]:
    """A storm of SMS deferred for an hour, then one email whose worker is killed right after
    claiming it: (fleet, its transaction, the email's delivery id)."""
    fleet = _storm(make_fleet, STORM, {"rate": 1, "per": "1h", "burst": 1})
    stuck = fleet.intake.submit(Event(kind="alert", title="later", to=("r0",),
                                      channels=("email",)), Source.API).transaction_id
    fleet.publisher.tasks.clear()
    _fan_out(fleet.deps, [stuck])
    (email,) = fleet.deps.ledger.deliveries(stuck)
    fleet.deps.ledger.claim(email.id, "killed-worker", 120.0)
    time.sleep(0.05)
    return fleet, stuck, email.id


def test_a_lost_delivery_behind_a_deferred_backlog_is_requeued(make_fleet: MakeFleet) -> None:
    fleet, stuck, email_id = _lost_behind_a_storm(make_fleet)
    ledger = fleet.deps.ledger
    assert fleet.redis.zcard("ntf:open") == STORM  # 509 deferred SMS + the email
    assert reap(ledger, fleet.publisher, stale_after=0.0, lease=0.0) == [email_id]
    # the requeued task takes the dead worker's claim over (its lease is over) and sends
    fleet.deps.claim_lease = 0.0
    fleet.drain()
    assert ledger.transaction(stuck).status == "delivered"  # type: ignore[union-attr]
    # the sweep after it has nothing to requeue: the waiting ones are not due before their timer
    assert reap(ledger, fleet.publisher, stale_after=0.0, lease=0.0) == []


def test_a_sweep_reads_at_most_its_pages_and_the_next_sweeps_go_on(make_fleet: MakeFleet) -> None:
    fleet, _, email_id = _lost_behind_a_storm(make_fleet)
    sweeps = [reap(fleet.deps.ledger, fleet.publisher, stale_after=0.0, lease=0.0, page=100,
                   max_pages=2) for _ in range(3)]
    # 509 waiting SMS are older than the email: 200 a sweep are looked at and put back behind
    assert sweeps == [[], [], [email_id]]


def test_a_waiting_delivery_whose_timer_was_lost_is_requeued_once_overdue(
        make_fleet: MakeFleet) -> None:
    fleet = _storm(make_fleet, 2, {"rate": 1, "per": "1s", "burst": 1})
    ledger = fleet.deps.ledger
    waiting = [d for t in ledger.redis.zrange("ntf:open", 0, -1)
               for d in [ledger.delivery(t.decode())] if d is not None]
    assert [d.status for d in waiting] == ["deferred"]
    (deferred,) = waiting
    assert deferred.next_at is not None
    # its timer is lost (the scheduler never fires it): the reaper must still come back to it
    assert reap(ledger, fleet.publisher, stale_after=0.3, lease=10.0) == []
    time.sleep(max(0.0, deferred.next_at + 0.3 - time.time()) + 0.1)
    assert reap(ledger, fleet.publisher, stale_after=0.3, lease=10.0) == [deferred.id]
