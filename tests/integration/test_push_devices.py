"""A person with two phones (two push tokens), one of them dead: the live phone carries the
alert and the route's fallback does not page them a second time; only when every device of
theirs failed does the message go on to the next channel, once."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from notifier.channels.sandbox import outbox_key
from notifier.ledger import DeliveryRecord, delivery_key
from notifier.ledger_counts import COUNTED
from notifier.ledger_keys import DEADLETTERS
from notifier.models import Event, Source
from notifier.pipeline.deliver import deliver
from notifier.pipeline.dispatch import _fan_out
from notifier.pipeline.outcomes import Outcomes
from notifier.pipeline.reaper import reap
from tests.integration.conftest import MakeFleet
from tests.support.inline import InlineFleet
from tests.support.interleave import interleaved


def config(fallback: list[str]) -> dict[str, Any]:
    return {
        "channels": {"push": {"provider": "sandbox"}, "email": {"provider": "sandbox"}},
        "recipients": {"alice": {"email": "alice@example.com", "push_tokens": ["tok-a", "tok-b"]}},
        "routes": [{"match": {}, "to": ["alice"], "channels": ["push"], "fallback": fallback}],
    }


def fanned_out(fleet: InlineFleet) -> tuple[str, DeliveryRecord, DeliveryRecord]:
    """An alert for alice, fanned out: (its transaction, the push to tok-a, the push to tok-b)."""
    txid = fleet.intake.submit(Event(kind="alert", title="DB down", severity="critical"),
                               Source.API).transaction_id
    fleet.publisher.tasks.clear()
    _fan_out(fleet.deps, [txid])
    fleet.publisher.tasks.clear()  # their deliver tasks: each test runs what it needs
    a, b = fleet.deps.ledger.deliveries(txid)
    assert (a.address, b.address) == ("tok-a", "tok-b")
    return txid, a, b


def sent(fleet: InlineFleet, channel: str) -> list[dict[str, Any]]:
    return [json.loads(x) for x in fleet.redis.lrange(outbox_key(channel), 0, -1)]


def status(fleet: InlineFleet, txid: str) -> str:
    tx = fleet.deps.ledger.transaction(txid)
    assert tx is not None
    return tx.status


def test_a_dead_device_is_carried_by_the_one_still_on_its_way(make_fleet: MakeFleet) -> None:
    fleet = make_fleet(config(["email"]))
    txid, dead, live = fanned_out(fleet)
    assert Outcomes(fleet.deps).fall_back(dead, "permanent", "UNREGISTERED") == "fallen_back"
    assert deliver(fleet.deps, live.id, uuid.uuid4().hex) == "sent"
    fleet.drain()
    assert [m["to"] for m in sent(fleet, "push")] == ["tok-b"]
    assert sent(fleet, "email") == []  # not paged a second time
    after = fleet.deps.ledger.delivery(dead.id)
    assert after is not None and after.status == "fallen_back"
    assert f"(carried by {live.id})" in after.reason
    assert status(fleet, txid) == "delivered"


def test_a_dead_device_is_carried_by_the_one_that_reached_them(make_fleet: MakeFleet) -> None:
    fleet = make_fleet(config(["email"]))
    txid, dead, live = fanned_out(fleet)
    assert deliver(fleet.deps, live.id, uuid.uuid4().hex) == "sent"
    assert Outcomes(fleet.deps).fall_back(dead, "permanent", "UNREGISTERED") == "fallen_back"
    fleet.drain()
    assert sent(fleet, "email") == []
    assert status(fleet, txid) == "delivered"


def test_every_device_dead_goes_on_to_the_next_channel_once(make_fleet: MakeFleet) -> None:
    fleet = make_fleet(config(["email"]))
    txid, first, second = fanned_out(fleet)
    assert Outcomes(fleet.deps).fall_back(first, "permanent", "UNREGISTERED") == "fallen_back"
    assert Outcomes(fleet.deps).fall_back(second, "permanent", "UNREGISTERED") == "fallen_back"
    fleet.drain()
    assert [m["to"] for m in sent(fleet, "email")] == ["alice@example.com"]
    assert status(fleet, txid) == "delivered"


def test_two_devices_failing_at_once_still_reach_the_next_channel(make_fleet: MakeFleet) -> None:
    """The worst interleaving: tok-b's worker has found tok-a still on its way (so tok-a
    carries it), and before it writes that down, tok-a's worker fails and looks for a carrier
    in turn. It must not take tok-b for one: then neither would carry the alert on."""
    fleet = make_fleet(config(["email"]))
    txid, a, b = fanned_out(fleet)
    with interleaved(fleet.deps.ledger.redis, lambda args: delivery_key(b.id) in args,  # b's check
                     lambda: Outcomes(fleet.deps).fall_back(a, "permanent", "UNREGISTERED"),
                     after=True) as raced:
        b_result = Outcomes(fleet.deps).fall_back(b, "permanent", "UNREGISTERED")
    fleet.drain()

    assert raced == ["fallen_back"] and b_result == "fallen_back"
    shown = [(d.id, d.channel, d.status, d.reason) for d in fleet.deps.ledger.deliveries(txid)]
    assert [m["to"] for m in sent(fleet, "email")] == ["alice@example.com"], shown
    assert status(fleet, txid) == "delivered"


def test_with_no_fallback_left_the_last_dead_device_fails_the_alert(make_fleet: MakeFleet) -> None:
    fleet = make_fleet(config([]))
    txid, first, second = fanned_out(fleet)
    assert Outcomes(fleet.deps).fall_back(first, "permanent", "UNREGISTERED") == "fallen_back"
    assert Outcomes(fleet.deps).fall_back(second, "permanent", "UNREGISTERED") == "failed"
    assert status(fleet, txid) == "failed"
    assert fleet.redis.zscore(DEADLETTERS, txid) is not None


def test_a_worker_killed_after_finding_the_carrier_leaves_the_delivery_to_recovery(
        make_fleet: MakeFleet) -> None:
    """The ledger a worker leaves when killed right after the carrier check (its delivery is
    marked carried, nothing more written): the reaper hands the delivery on again, and it ends
    counted and rolled up like any other."""
    fleet = make_fleet(config(["email"]))
    txid, dead, live = fanned_out(fleet)
    assert deliver(fleet.deps, live.id, uuid.uuid4().hex) == "sent"
    carrier, created = fleet.deps.ledger.add_fallback(dead, "email", [])
    assert carrier == (live.id, "push") and created == []
    time.sleep(0.01)
    reap(fleet.deps.ledger, fleet.publisher, stale_after=0.0, lease=0.0)
    fleet.drain()
    after = fleet.deps.ledger.delivery(dead.id)
    assert after is not None and after.status in ("sent", "fallen_back")
    assert fleet.redis.hget(delivery_key(dead.id), COUNTED) is not None  # counted once it ended
    assert sent(fleet, "email") == []
    assert status(fleet, txid) == "delivered"


def test_a_device_marked_carried_that_was_sent_after_all_carries_the_other(
        make_fleet: MakeFleet) -> None:
    """tok-a's worker was killed after the carrier check; its redelivered task sent it after
    all. When tok-b then fails, tok-a (sent) carries it: no page on the fallback channel."""
    fleet = make_fleet(config(["email"]))
    txid, first, second = fanned_out(fleet)
    assert fleet.deps.ledger.add_fallback(first, "email", [])[0] == (second.id, "push")
    assert deliver(fleet.deps, first.id, uuid.uuid4().hex) == "sent"
    assert Outcomes(fleet.deps).fall_back(second, "permanent", "UNREGISTERED") == "fallen_back"
    fleet.drain()
    assert sent(fleet, "email") == []
    assert status(fleet, txid) == "delivered"
