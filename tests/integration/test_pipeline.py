"""The delivery pipeline on a real redis-server with real providers (Dysmsapi fake, sandbox),
driven task by task without Celery: digests, budgets, provider fallback, breakers, dead
letters, maybe-sent look-ups, deferral."""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import pytest
from fastapi.testclient import TestClient

from notifier.api.app import create_app
from notifier.breaker import FleetBreaker
from notifier.channels.base import ChannelContext
from notifier.channels.sandbox import SandboxSms, outbox_key, read_outbox
from notifier.client import as_event
from notifier.config import SandboxProvider, settings_from_mapping
from notifier.errors import BrokerUnavailable, InvalidEvent
from notifier.intake import Intake
from notifier.models import Event, Outgoing, Receipt, Source
from notifier.operations import replay_dead_letter
from notifier.pipeline.dispatch import dispatch
from notifier.pipeline.pacing import Pacer
from notifier.pipeline.reaper import reap
from notifier.ratelimit import Bucket
from notifier.schemas import AlertmanagerWebhook
from notifier.sources import from_alertmanager
from notifier.tasks_spec import DISPATCH_QUEUE
from tests.fakes.dysmsapi import FakeDysmsapi
from tests.integration.conftest import SMS_ENV, MakeFleet
from tests.integration.test_api import FIXTURES, TOKEN
from tests.support.inline import InlineFleet

ENV = SMS_ENV
FAST_RETRY = {"max_attempts": 3, "base_delay": "50ms", "max_delay": "200ms", "jitter": 0}


def aliyun(fake: FakeDysmsapi, **extra: Any) -> dict[str, Any]:
    return {"provider": "aliyun", "endpoint": fake.endpoint, "protocol": "http",
            "sign_name": "运维告警", "templates": {"alert": "SMS_1", "digest": "SMS_9"},
            "read_timeout": "500ms", "connect_timeout": "500ms", **extra}


def config(sms: dict[str, Any], **channel_policy: Any) -> dict[str, Any]:
    # Tests send alice several SMS a minute on purpose: no per-number carrier default here.
    policy = {**({} if "recipient_limits" in sms else {"recipient_limits": []}), **channel_policy}
    return {
        "channels": {"sms": {**sms, "retry": FAST_RETRY, **policy},
                     "email": {"provider": "sandbox"}},
        "recipients": {"alice": {"phone": "+8613800138000", "email": "alice@example.com"}},
        "routes": [{"match": {}, "to": ["alice"], "channels": ["sms"], "fallback": ["email"]}],
    }


def submit(fleet: InlineFleet, title: str = "DiskFull", **fields: Any) -> str:
    event = Event(kind="alert", title=title, severity="critical", **fields)
    return fleet.intake.submit(event, Source.API).transaction_id


def outbox(fleet: InlineFleet, channel: str) -> list[dict[str, Any]]:
    return [json.loads(x) for x in fleet.redis.lrange(outbox_key(channel), 0, -1)]


def test_storm_to_one_phone_becomes_one_digest(make_fleet: MakeFleet) -> None:
    sms = {"provider": "sandbox", "recipient_limits": [{"rate": 1, "per": "6s", "burst": 1}]}
    fleet = make_fleet(config(sms))
    txids = [submit(fleet, f"alert {i}") for i in range(40)]
    fleet.drain(timers_until=10)
    sent = outbox(fleet, "sms")
    assert len(sent) == 2, [s["kind"] for s in sent]  # the first alert, then one digest
    digest = next(s for s in sent if s["kind"] == "digest")
    assert "39" in json.dumps(digest["params"], ensure_ascii=False) + digest["text"]
    statuses = [fleet.deps.ledger.transaction(t).status for t in txids]  # type: ignore[union-attr]
    assert statuses == ["delivered"] * 40
    merged = [d for t in txids for d in fleet.deps.ledger.deliveries(t) if d.digest_id]
    assert len(merged) == 39 and {d.status for d in merged} == {"suppressed"}
    carrier = fleet.deps.ledger.delivery(merged[0].digest_id)
    assert carrier is not None and sorted(carrier.digest_of) == sorted(d.id for d in merged)
    assert carrier.status == "sent" and outbox(fleet, "email") == []


def test_spent_day_budget_falls_back_at_once(make_fleet: MakeFleet) -> None:
    sms = {"provider": "sandbox", "recipient_limits": [{"rate": 2, "per": "1d", "burst": 2}]}
    fleet = make_fleet(config(sms))
    txids = [submit(fleet, f"alert {i}") for i in range(3)]
    fleet.drain()
    assert len(outbox(fleet, "sms")) == 2 and len(outbox(fleet, "email")) == 1
    third = fleet.deps.ledger.deliveries(txids[2])
    assert [(d.channel, d.status) for d in third] == [("sms", "fallen_back"), ("email", "sent")]
    assert third[0].reason.startswith("recipient_budget")


def test_account_error_moves_to_the_channels_next_provider(make_fleet: MakeFleet,
        sms_fake: FakeDysmsapi) -> None:
    sms_fake.script({"kind": "business", "code": "isv.AMOUNT_NOT_ENOUGH", "message": "余额不足"})
    sms = {**aliyun(sms_fake), "providers": [{"provider": "sandbox", "name": "backup"}]}
    fleet = make_fleet(config(sms), ENV)
    txid = submit(fleet)
    fleet.drain()
    (delivery,) = fleet.deps.ledger.deliveries(txid)
    assert delivery.status == "sent" and delivery.provider == "backup"
    attempts = fleet.deps.ledger.attempts(delivery.id)
    assert [(a["provider"], a["outcome"]) for a in attempts] == [("aliyun", "account"),
                                                                  ("backup", "sent")]
    assert any(h["event"] == "provider_fallback" for h in fleet.deps.ledger.history(txid))


def test_open_breaker_skips_the_provider_call(make_fleet: MakeFleet,
        sms_fake: FakeDysmsapi) -> None:
    fleet = make_fleet(config(aliyun(sms_fake)), ENV)
    policy = fleet.settings.channels["sms"].breaker
    FleetBreaker(fleet.redis, "sms:aliyun", policy).force_open("test", "provider outage drill")
    txid = submit(fleet)
    fleet.drain()
    assert sms_fake.requests.total() == 0
    sms, email = fleet.deps.ledger.deliveries(txid)
    assert (sms.status, sms.reason) == ("fallen_back", "circuit_open: sms:aliyun")
    assert (email.channel, email.status) == ("email", "sent")


def test_an_open_breaker_costs_the_phone_no_message_of_its_limit(make_fleet: MakeFleet) -> None:
    """The primary account's breaker is open: each alert goes by the backup account, and the
    request it never made on the primary must not count against the person's limit (2 a
    minute: both alerts of the minute go out by SMS, none held for a digest)."""
    sms = {"providers": [{"provider": "sandbox", "name": "primary"},
                         {"provider": "sandbox", "name": "backup"}],
           "recipient_limits": [{"rate": 1, "per": "60s", "burst": 2}]}
    fleet = make_fleet(config(sms))
    FleetBreaker(fleet.redis, "sms:primary", fleet.settings.channels["sms"].breaker
                 ).force_open("test", "primary account outage")
    txids = [submit(fleet, f"alert {i}") for i in range(2)]
    fleet.drain()
    assert len(outbox(fleet, "sms")) == 2
    for txid in txids:
        (delivery,) = fleet.deps.ledger.deliveries(txid)
        assert (delivery.status, delivery.provider) == ("sent", "backup")


def test_breaker_opens_after_repeated_transient_failures(make_fleet: MakeFleet,
        sms_fake: FakeDysmsapi) -> None:
    sms_fake.script({"kind": "gateway", "status": 503, "code": "ServiceUnavailable", "times": 20})
    fleet = make_fleet(config(aliyun(sms_fake), breaker={"fail_max": 3,
                                                                     "reset_timeout": "60s"}), ENV)
    txids = [submit(fleet, f"a{i}") for i in range(3)]
    fleet.drain(timers_until=3)
    status = FleetBreaker(fleet.redis, "sms:aliyun",
                          fleet.settings.channels["sms"].breaker).status()
    assert status.state.value == "open"
    calls = sms_fake.requests.total()
    assert calls <= 4, calls  # fail_max failures (+ a racing one) and then no more calls
    for txid in txids:  # every alert still reached alice, by email
        assert fleet.deps.ledger.transaction(txid).status == "delivered"  # type: ignore[union-attr]
    assert len(outbox(fleet, "email")) == 3
    metrics = fleet.redis.hgetall("ntf:m:notifier_fallbacks")
    assert any(b"circuit_open" in k or b"retries_exhausted" in k for k in metrics)


def failing_once(make_fleet: MakeFleet, sms_fake: FakeDysmsapi) -> tuple[InlineFleet, str]:
    """A fleet whose first SMS is refused for good (no fallback), and that SMS' dead letter."""
    sms_fake.script({"kind": "business", "code": "isv.MOBILE_NUMBER_ILLEGAL", "times": 1})
    cfg = config(aliyun(sms_fake))
    cfg["routes"][0]["fallback"] = []
    fleet = make_fleet(cfg, ENV)
    txid = submit(fleet)
    fleet.drain()
    assert [t for t, _ in fleet.deps.ledger.dead_letters()] == [txid]
    return fleet, txid


def test_everything_failing_dead_letters_and_replay_sends_again(make_fleet: MakeFleet,
        sms_fake: FakeDysmsapi) -> None:
    fleet, txid = failing_once(make_fleet, sms_fake)
    assert fleet.deps.ledger.transaction(txid).status == "failed"  # type: ignore[union-attr]
    new_txid = replay_dead_letter(fleet.deps.ledger, fleet.intake, txid)
    assert new_txid is not None and new_txid != txid
    fleet.drain()
    assert fleet.deps.ledger.transaction(new_txid).status == "delivered"  # type: ignore[union-attr]
    assert fleet.deps.ledger.dead_letters() == []
    assert len(sms_fake.messages) == 1


def test_a_replay_that_fails_part_way_keeps_the_dead_letter(make_fleet: MakeFleet,
        sms_fake: FakeDysmsapi) -> None:
    fleet, txid = failing_once(make_fleet, sms_fake)
    before = fleet.deps.ledger.dead_letters()
    # A retention Redis refuses: the accept script stops at its first EXPIRE, after a write (a
    # script is not rolled back), before the dispatch task; the dead letter must stay.
    broken = Intake(fleet.settings, fleet.deps.ledger)
    broken.policy = dataclasses.replace(broken.policy, retention=1e300)
    with pytest.raises(BrokerUnavailable):
        replay_dead_letter(fleet.deps.ledger, broken, txid)
    assert fleet.deps.ledger.dead_letters() == before
    assert fleet.redis.llen(DISPATCH_QUEUE) == 0  # nothing queued that would send it


def test_a_drill_event_goes_out_from_a_drill_and_is_refused_from_the_client(
        make_fleet: MakeFleet) -> None:
    fleet = make_fleet(config({"provider": "sandbox", "recipient_limits": []}))
    with pytest.raises(InvalidEvent, match=r"^kind: 'drill' is reserved"):
        fleet.intake.submit(as_event({"kind": "drill", "title": "DR drill: switch"}), Source.CLIENT)
    drill = Event(kind="drill", title="DR drill: switch", to=("alice",),
                  extra={"reply_code": "4711", "drill_name": "DR drill", "phase": "switch"})
    txid = fleet.intake.submit(drill, Source.DRILL).transaction_id
    fleet.drain()
    assert fleet.deps.ledger.transaction(txid).status == "delivered"  # type: ignore[union-attr]
    [sms] = outbox(fleet, "sms")
    assert "4711" in json.dumps(sms, ensure_ascii=False)


def test_an_event_naming_a_channel_twice_sends_one_message(make_fleet: MakeFleet,
        sms_fake: FakeDysmsapi, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # One event, "channels": ["sms", "sms", ...] from an API sender: each repeat was a delivery
    # of its own, so the phone got the same SMS once per repeat (50 here).
    cfg = {**config(aliyun(sms_fake)), "routes": [{"match": {}, "to": ["alice"], "channels": ["email"]}]}
    monkeypatch.setenv("NOTIFIER_API_TOKEN", TOKEN)
    app = create_app(settings_from_mapping({**cfg, "redis_url": redis_url}))
    with TestClient(app, headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        accepted = client.post("/v1/events", json={"title": "DiskFull", "channels": ["sms"] * 50})
    assert accepted.status_code == 202, accepted.text
    fleet = make_fleet(cfg)
    fleet.take_queued_dispatches()
    fleet.drain()
    assert [m["phone"] for m in sms_fake.messages] == ["13800138000"]
    txid = accepted.json()["transaction_id"]
    assert fleet.deps.ledger.transaction(txid).event.channels == ("sms",)  # type: ignore[union-attr]


def test_a_route_matches_an_alertmanager_receiver_by_its_name(make_fleet: MakeFleet, redis_url: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Alertmanager 0.25 sends the receiver's name regex-quoted (as captured from it): the route
    # for `ops.pager` must take its webhooks, not the catch-all after it.
    cfg = {"channels": {"email": {"provider": "sandbox"}},
           "recipients": {"alice": {"email": "alice@example.com"}, "bob": {"email": "bob@example.com"}},
           "routes": [{"match": {"receiver": "ops.pager"}, "to": ["alice"], "channels": ["email"]},
                      {"match": {}, "to": ["bob"], "channels": ["email"]}]}
    body = {**json.loads((FIXTURES / "alertmanager-firing.json").read_text()), "receiver": "ops\\.pager"}
    monkeypatch.setenv("NOTIFIER_API_TOKEN", TOKEN)
    app = create_app(settings_from_mapping({**cfg, "redis_url": redis_url}))
    with TestClient(app, headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        assert client.post("/v1/alertmanager", json=body).status_code == 200
    fleet = make_fleet(cfg)
    fleet.take_queued_dispatches()
    fleet.drain()
    assert [m["to"] for m in outbox(fleet, "email")] == ["alice@example.com"]


def test_a_webhook_with_an_impossible_start_time_still_reaches_email(make_fleet: MakeFleet) -> None:
    # startsAt is a free string in the webhook: one shaped like a time but impossible (month 13)
    # is accepted, and must not fail the email's template.
    fleet = make_fleet({**config({"provider": "sandbox", "recipient_limits": []}),
                        "routes": [{"match": {}, "to": ["alice"], "channels": ["email"]}]})
    body = json.loads((FIXTURES / "alertmanager-firing.json").read_text())
    body["alerts"][0]["startsAt"] = "2026-13-01T03:45:06Z"
    event = from_alertmanager(AlertmanagerWebhook.model_validate(body))
    txid = fleet.intake.submit(event, Source.ALERTMANAGER).transaction_id
    fleet.drain()
    reasons = [d.reason for d in fleet.deps.ledger.deliveries(txid)]
    assert fleet.deps.ledger.transaction(txid).status == "delivered", reasons  # type: ignore[union-attr]
    [email] = outbox(fleet, "email")
    assert "2026-13-01T03:45:06Z" in json.dumps(email)


def test_read_timeout_after_send_is_looked_up_not_resent(make_fleet: MakeFleet,
        sms_fake: FakeDysmsapi) -> None:
    sms_fake.script({"kind": "stall", "seconds": 1.5})
    fleet = make_fleet(config(aliyun(sms_fake)), ENV)
    txid = submit(fleet)
    fleet.drain(timers_until=3)
    (delivery,) = fleet.deps.ledger.deliveries(txid)
    outcomes = [a["outcome"] for a in fleet.deps.ledger.attempts(delivery.id)]
    assert outcomes == ["maybe_sent", "found_after_timeout"]
    assert delivery.status == "sent" and len(sms_fake.messages) == 1
    # QuerySendDetails has no BizId: the look-up matched the message by our OutId.
    assert sms_fake.messages[0]["out_id"] == delivery.id


def test_channel_limit_defers_and_never_drops(make_fleet: MakeFleet) -> None:
    sms = {"provider": "sandbox", "rate_limit": {"rate": 10, "per": "1s", "burst": 2}}
    fleet = make_fleet(config(sms))
    txids = [submit(fleet, f"alert {i}") for i in range(6)]
    fleet.drain(timers_until=3)
    assert len(outbox(fleet, "sms")) == 6
    deferred = [a for t in txids for d in fleet.deps.ledger.deliveries(t)
                for a in fleet.deps.ledger.attempts(d.id) if a["outcome"] == "deferred"]
    assert deferred, "a burst over the channel limit must be deferred"
    assert all(fleet.deps.ledger.transaction(t).status == "delivered" for t in txids)  # type: ignore[union-attr]


def test_a_channel_limit_below_one_per_second_paces_instead_of_stopping(make_fleet: MakeFleet
                                                                       ) -> None:
    """'One SMS every two seconds' sends the first at once and paces the next, on SMS."""
    fleet = make_fleet(config({"provider": "sandbox", "rate_limit": {"rate": 0.5, "per": "1s"}}))
    first, second = submit(fleet, "first"), submit(fleet, "second")
    fleet.drain(timers_until=3)
    assert sorted(m["delivery_id"] for m in outbox(fleet, "sms")) == [f"{first}.0", f"{second}.0"]
    assert outbox(fleet, "email") == []
    for txid in (first, second):
        assert fleet.deps.ledger.transaction(txid).status == "delivered"  # type: ignore[union-attr]


def test_newcomers_queue_behind_every_paced_delivery_not_only_the_first_minute(
        make_fleet: MakeFleet) -> None:
    """Deferred deliveries wait in the channel's schedule, and a newcomer queues behind its
    tail (Pacer.key) until the last slot handed out. The tail key must outlive that slot: once
    it expires, newcomers take the tokens the waiting deliveries were woken for, and those are
    all re-deferred at once to slots that clash with the ones still booked."""
    fleet = make_fleet(config({"provider": "sandbox",
                               "rate_limit": {"rate": 1, "per": "30s", "burst": 1}}))
    txids = [submit(fleet, f"alert {i}") for i in range(8)]
    fleet.drain()
    assert len(outbox(fleet, "sms")) == 1
    last = max(d.next_at or 0.0 for t in txids for d in fleet.deps.ledger.deliveries(t))
    tail = Pacer.key(Bucket("sms", fleet.settings.channels["sms"].rate_limit))  # type: ignore[arg-type]
    assert last - time.time() > 180  # seven slots, 30 s apart
    assert fleet.redis.pttl(tail) / 1000 >= last - time.time()


def test_reaper_requeues_lost_tasks_and_finishes_orphaned_rollups(make_fleet: MakeFleet) -> None:
    fleet = make_fleet(config({"provider": "sandbox"}))
    lost, orphan = submit(fleet, "task lost with its worker"), submit(fleet, "rolled up never")
    for _task, args, _ in list(fleet.publisher.tasks):  # run the dispatches only
        if args[0] in (lost, orphan):
            dispatch(fleet.deps, args[0])
    fleet.publisher.tasks.clear()  # ...and lose every deliver task, as a SIGKILL would
    (orphaned,) = fleet.deps.ledger.deliveries(orphan)
    fleet.deps.ledger.update(orphaned.id, status="sent")  # sent, then the worker died
    ledger = fleet.deps.ledger
    assert reap(ledger, fleet.publisher, stale_after=60, lease=10) == []  # not stale yet
    time.sleep(1.1)
    requeued = reap(ledger, fleet.publisher, stale_after=1, lease=10)
    assert requeued == [f"{lost}.0"]
    assert ledger.transaction(orphan).status == "delivered"  # type: ignore[union-attr]
    fleet.drain()
    assert ledger.transaction(lost).status == "delivered"  # type: ignore[union-attr]
    assert reap(ledger, fleet.publisher, stale_after=0, lease=10) == []
    assert fleet.redis.zcard("ntf:open") == 0


# What the pipeline does with each Dysmsapi failure class (the channel tests check the
# classification itself; here: the retry delay, the fallback, the provider calls).
ERROR_WALK = [
    ({"kind": "business", "code": "isp.SYSTEM_ERROR", "message": "系统错误"},
     "retry", 0.0, ["transient", "sent"]),
    ({"kind": "gateway", "status": 400, "code": "Throttling.User", "retry_after": 1500},
     "retry", 1.5, ["transient", "sent"]),
    ({"kind": "business", "code": "isv.BUSINESS_LIMIT_CONTROL", "message": "触发分钟级流控Permits:1"},
     "retry", 60.0, ["transient"]),
    ({"kind": "business", "code": "isv.BUSINESS_LIMIT_CONTROL", "message": "触发天级流控Permits:10"},
     "fallback", 0.0, ["recipient_budget"]),
    ({"kind": "business", "code": "isv.AMOUNT_NOT_ENOUGH", "message": "账户余额不足"},
     "fallback", 0.0, ["account"]),
    ({"kind": "hang", "seconds": 2}, "retry", 0.0, ["maybe_sent", "sent"]),
]


@pytest.mark.parametrize(("behaviour", "then", "waits_at_least", "outcomes"), ERROR_WALK,
                         ids=lambda v: v["code" if "code" in v else "kind"] if isinstance(v, dict) else None)
def test_each_aliyun_error_class_is_handled_as_the_table_says(
        make_fleet: MakeFleet, sms_fake: FakeDysmsapi, behaviour: dict[str, Any], then: str,
        waits_at_least: float, outcomes: list[str]) -> None:
    sms_fake.script(behaviour)
    fleet = make_fleet(config(aliyun(sms_fake)), ENV)
    txid = submit(fleet)
    fleet.drain(timers_until=3 if waits_at_least < 10 else 0)
    sms = fleet.deps.ledger.deliveries(txid)[0]
    attempts = fleet.deps.ledger.attempts(sms.id)
    assert [a["outcome"] for a in attempts] == outcomes
    if then == "retry":
        first = attempts[0]
        assert first["retry_at"] - first["at"] >= waits_at_least
        if waits_at_least >= 10:  # not due within this test: waiting on its timer, not lost
            assert sms.status == "retrying" and fleet.deps.timers.pending() == 1
        else:
            assert sms.status == "sent"
    else:
        channels = [(d.channel, d.status) for d in fleet.deps.ledger.deliveries(txid)]
        assert channels == [("sms", "fallen_back"), ("email", "sent")]
        assert sms.error_code == behaviour["code"]


def test_dispatch_rerun_after_a_crash_mid_fanout_still_creates_every_delivery(
        make_fleet: MakeFleet) -> None:
    fleet = make_fleet(config({"provider": "sandbox"}))
    txid = submit(fleet)
    # What a worker killed inside an older, two-step write left behind: a bare marker.
    fleet.redis.hset(f"ntf:dl:{txid}.0", "id", f"{txid}.0")
    fleet.drain()
    (delivery,) = fleet.deps.ledger.deliveries(txid)
    assert delivery.id == f"{txid}.0" and delivery.status == "sent"
    assert fleet.deps.ledger.transaction(txid).status == "delivered"  # type: ignore[union-attr]
    again = fleet.deps.ledger.add_deliveries([delivery])  # a redelivered dispatch adds nothing
    assert again == [] and len(fleet.deps.ledger.deliveries(txid)) == 1


class _CrashesAfterSending(SandboxSms):
    """A provider with a bug: the message goes out, then its code raises something no error
    table knows (as would the task's soft time limit firing mid-request)."""

    crashes = 1

    async def send(self, message: Outgoing) -> Receipt:
        receipt = await super().send(message)
        if self.crashes:
            self.crashes -= 1
            raise RuntimeError("bug after the request left")
        return receipt

    async def lookup(self, message: Outgoing, sent_after: float) -> Receipt | None:
        for entry in read_outbox(ChannelContext(redis=self.redis), "sms", 100):
            if entry["delivery_id"] in (message.delivery_id, *message.aliases):
                return Receipt(provider_message_id=str(entry["provider_message_id"]))
        return None


def test_an_unexpected_error_mid_send_is_looked_up_before_sending_again(make_fleet: MakeFleet) -> None:
    fleet = make_fleet(config({"provider": "sandbox"}))
    buggy = _CrashesAfterSending(SandboxProvider(provider="sandbox"), ChannelContext(redis=fleet.redis))
    fleet.deps.providers = {**fleet.deps.providers, "sms": [buggy]}
    txid = submit(fleet)
    fleet.drain(timers_until=3)
    (delivery,) = fleet.deps.ledger.deliveries(txid)
    assert [a["outcome"] for a in fleet.deps.ledger.attempts(delivery.id)] == [
        "maybe_sent", "found_after_timeout"]
    assert delivery.status == "sent" and len(outbox(fleet, "sms")) == 1  # sent once, not twice
