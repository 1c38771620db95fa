"""Routing, fan-out, backoff and the transaction roll-up: plain Python, no Redis."""

from __future__ import annotations

import random

from notifier.config import RetryPolicy, settings_from_mapping
from notifier.ledger import DeliveryRecord
from notifier.models import Event, TxStatus
from notifier.pipeline.backoff import RETRY_AFTER_MAX, retry_delay
from notifier.pipeline.fanout import plan_deliveries
from notifier.pipeline.rollup import transaction_status
from notifier.pipeline.routing import plan_route

SETTINGS = settings_from_mapping({
    "channels": {"sms": {"provider": "sandbox"}, "email": {"provider": "sandbox"},
                 "push": {"provider": "sandbox"}},
    "recipients": {
        "alice": {"phone": "+8613800138000", "email": "a@example.com", "push_tokens": ["t1", "t2"]},
        "bob": {"email": "b@example.com"},
        "carol": {},
    },
    "groups": {"oncall": ["alice", "bob"], "all": ["alice", "bob", "carol"]},
    "routes": [
        {"match": {"severity": "critical"}, "match_re": {"cluster": "hz|sh"}, "to": ["oncall"],
         "channels": ["sms", "push"], "fallback": ["email"]},
        {"match": {"receiver": "team-b"}, "to": ["bob"], "channels": ["email"]},
        {"match": {}, "to": ["all"], "channels": ["email"]},
    ],
})


def test_first_matching_route_wins_on_labels_and_receiver() -> None:
    critical = Event(kind="alert", title="x", severity="critical", labels={"cluster": "hz"})
    plan = plan_route(SETTINGS, critical)
    assert plan is not None and plan.route_index == 0
    assert plan.recipients == ("alice", "bob") and plan.channels == ("sms", "push")
    other_cluster = Event(kind="alert", title="x", severity="critical", labels={"cluster": "bj"})
    assert plan_route(SETTINGS, other_cluster, receiver="team-b").route_index == 1  # type: ignore[union-attr]
    assert plan_route(SETTINGS, other_cluster).route_index == 2  # type: ignore[union-attr]


def test_match_on_an_empty_value_matches_a_missing_label_as_alertmanager_does() -> None:
    # Alertmanager treats a missing label as the empty string, so `team=""` is the usual way
    # to route what carries no team; match_re already read it so, match must agree.
    settings = settings_from_mapping({
        "channels": {"email": {"provider": "sandbox"}},
        "recipients": {"bob": {"email": "b@example.com"}, "carol": {"email": "c@example.com"}},
        "routes": [{"match": {"team": ""}, "to": ["carol"], "channels": ["email"]},
                   {"match": {}, "to": ["bob"], "channels": ["email"]}],
    })
    unowned = Event(kind="alert", title="x", labels={"alertname": "Disk"})
    owned = Event(kind="alert", title="x", labels={"team": "db"})
    assert plan_route(settings, unowned).recipients == ("carol",)  # type: ignore[union-attr]
    assert plan_route(settings, owned).recipients == ("bob",)  # type: ignore[union-attr]


def test_event_overrides_recipients_and_channels_but_keeps_route_fallback() -> None:
    event = Event(kind="alert", title="x", severity="critical", labels={"cluster": "hz"},
                  to=("bob",), channels=("sms",))
    plan = plan_route(SETTINGS, event)
    assert plan is not None
    assert plan.recipients == ("bob",) and plan.channels == ("sms",) and plan.fallback == ("email",)


def test_fanout_one_delivery_per_address_and_unreachable_recipients_fall_through() -> None:
    plan = plan_route(SETTINGS, Event(kind="alert", title="x", severity="critical",
                                      labels={"cluster": "hz"}))
    assert plan is not None
    records = plan_deliveries(SETTINGS, "tx-1", "alert", plan)
    summary = [(r.recipient, r.channel, r.address) for r in records]
    # alice: one SMS and one push per token; bob has neither, so starts on the fallback (email).
    assert summary == [("alice", "sms", "+8613800138000"), ("alice", "push", "t1"),
                       ("alice", "push", "t2"), ("bob", "email", "b@example.com")]
    assert records[3].reason.startswith("no address on sms, push")
    assert [r.id for r in records] == ["tx-1.0", "tx-1.1", "tx-1.2", "tx-1.3"]


def test_recipient_with_no_address_anywhere_gets_a_failing_delivery() -> None:
    plan = plan_route(SETTINGS, Event(kind="alert", title="x"))
    assert plan is not None
    records = plan_deliveries(SETTINGS, "tx-2", "alert", plan)
    carol = [r for r in records if r.recipient == "carol"]
    assert len(carol) == 1 and carol[0].address == "" and "no address" in carol[0].reason


def test_backoff_grows_exponentially_caps_and_honours_retry_after() -> None:
    policy = RetryPolicy(base_delay=1, max_delay=30, jitter=0)
    assert [retry_delay(policy, n) for n in (1, 2, 3, 4, 6, 10)] == [1, 2, 4, 8, 30, 30]
    assert retry_delay(policy, 1, retry_after=60) >= 60
    # A Retry-After no provider means ("inf", "1e12", "nan" through a proxy) cannot hold an
    # alert for ever: at most RETRY_AFTER_MAX, plus its upward jitter.
    for nonsense in (float("inf"), 1e12):
        assert RETRY_AFTER_MAX <= retry_delay(policy, 1, retry_after=nonsense) <= RETRY_AFTER_MAX * 1.2
    assert retry_delay(policy, 1, retry_after=float("nan")) == 1
    jittery = RetryPolicy(base_delay=10, max_delay=100, jitter=0.5)
    draws = {round(retry_delay(jittery, 1, rng=random.Random(seed)), 3) for seed in range(20)}
    assert len(draws) > 10 and all(5 <= d <= 15 for d in draws)


def _rec(status: str) -> DeliveryRecord:
    return DeliveryRecord(id="d", transaction_id="t", channel="sms", recipient="r", address="a",
                          kind="alert", status=status)


def test_rollup() -> None:
    assert transaction_status([_rec("sent"), _rec("queued")]) is TxStatus.DISPATCHING
    assert transaction_status([_rec("sent"), _rec("delivered")]) is TxStatus.DELIVERED
    assert transaction_status([_rec("fallen_back"), _rec("sent")]) is TxStatus.DELIVERED
    assert transaction_status([_rec("failed"), _rec("sent")]) is TxStatus.PARTIAL
    assert transaction_status([_rec("fallen_back"), _rec("failed")]) is TxStatus.FAILED
    assert transaction_status([]) is TxStatus.FAILED
