"""An event accepted under one config and dispatched under the next (the workers restarted
with a recipient renamed or removed while its event waited in the dispatch queue)."""

from __future__ import annotations

import json
from typing import Any

from notifier.channels.sandbox import outbox_key
from notifier.models import Event, Source
from notifier.pipeline.dispatch import dispatch_all
from tests.integration.conftest import MakeFleet

BEFORE: dict[str, Any] = {
    "channels": {"sms": {"provider": "sandbox", "recipient_limits": []}},
    "recipients": {"alice": {"phone": "+8613800138000"}, "bob": {"phone": "+8613800138001"}},
    "groups": {"dba": ["bob"]},
    "routes": [{"match": {}, "to": ["alice"], "channels": ["sms"]}],
}
AFTER: dict[str, Any] = {**BEFORE, "recipients": {"alice": BEFORE["recipients"]["alice"]},
                         "groups": {}}


def test_an_event_for_a_removed_recipient_fails_alone_and_the_rest_of_its_message_goes_out(
        make_fleet: MakeFleet) -> None:
    old = make_fleet(BEFORE)
    for_bob = old.intake.submit(Event(kind="alert", title="for bob", to=("bob",), channels=("sms",)),
                                Source.API).transaction_id
    for_dba = old.intake.submit(Event(kind="alert", title="for dba", to=("dba",), channels=("sms",)),
                                Source.API).transaction_id
    for_alice = old.intake.submit(Event(kind="alert", title="for alice"), Source.API).transaction_id
    old.publisher.tasks.clear()

    new = make_fleet(AFTER)
    # The three were accepted in the same moment: one dispatch message names them all.
    results = dispatch_all(new.deps, [for_bob, for_dba, for_alice], token="dispatch:t1")
    new.drain()

    texts = [json.loads(x) for x in new.redis.lrange(outbox_key("sms"), 0, -1)]
    assert [t["to"] for t in texts] == ["+8613800138000"]  # alice's alert went out
    assert new.deps.ledger.transaction(for_alice).status == "delivered"  # type: ignore[union-attr]
    # bob's and the dba group's reached nobody: failed, on the dead letters, not open for ever
    dead = {x.decode() for x in new.redis.zrange("ntf:deadletters", 0, -1)}
    for txid in (for_bob, for_dba):
        assert new.deps.ledger.transaction(txid).status == "failed"  # type: ignore[union-attr]
        assert txid in dead
    assert results[2] == "dispatched"


WITH_PUSH: dict[str, Any] = {
    **BEFORE,
    "channels": {**BEFORE["channels"], "push": {"provider": "sandbox"}},
    "recipients": {"alice": {"phone": "+8613800138000", "push_tokens": ["tok-a"]}}, "groups": {},
}


def test_an_event_for_a_removed_channel_fails_instead_of_staying_open(
        make_fleet: MakeFleet) -> None:
    old = make_fleet(WITH_PUSH)
    by_push = old.intake.submit(Event(kind="alert", title="by push", to=("alice",),
                                      channels=("push",)), Source.API).transaction_id
    for_alice = old.intake.submit(Event(kind="alert", title="for alice"), Source.API).transaction_id
    old.publisher.tasks.clear()

    new = make_fleet({**WITH_PUSH, "channels": BEFORE["channels"]})  # push taken out
    dispatch_all(new.deps, [by_push, for_alice], token="dispatch:t1")
    new.drain()

    ledger = new.deps.ledger
    assert ledger.transaction(for_alice).status == "delivered"  # type: ignore[union-attr]
    # Nothing can send it: failed and dead-lettered, not left 'sending' for the reaper for ever
    assert [(d.channel, d.status) for d in ledger.deliveries(by_push)] == [("push", "failed")]
    assert ledger.transaction(by_push).status == "failed"  # type: ignore[union-attr]
    assert new.redis.zscore("ntf:deadletters", by_push) is not None
