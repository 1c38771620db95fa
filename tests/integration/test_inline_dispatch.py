"""The dispatch step sends one delivery itself (no second Celery task), on a real redis-server
with the real Aliyun SDK against the Dysmsapi fake: what it queues, what a redelivered dispatch
does after a worker died mid-send (real processes, SIGKILL), and the reaper's rescue."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
from typing import Any

import pytest
from darabonba.core import DaraCore

from notifier.api.views import transaction_view
from notifier.channels.sms_aliyun import AliyunSms
from notifier.ledger import DeliveryRecord
from notifier.models import Event, Outgoing, Rendered, Source
from notifier.operations import Unreplayable, replay_dead_letter
from notifier.pipeline.deliver import _digest_events
from notifier.pipeline.dispatch import dispatch, dispatch_all, inline_token
from notifier.pipeline.reaper import reap
from notifier.tasks_spec import DELIVER, DISPATCH
from notifier.timeline import render_timeline
from tests.fakes.dysmsapi import FakeDysmsapi
from tests.integration.conftest import SMS_ENV, MakeFleet
from tests.support.inline import InlineFleet
from tests.support.servers import wait_until

ENV = SMS_ENV


def config(fake: FakeDysmsapi, *, channels: tuple[str, ...] = ("sms",),
           recipients: tuple[str, ...] = ("alice",), read_timeout: str = "500ms") -> dict[str, Any]:
    sms = {"provider": "aliyun", "endpoint": fake.endpoint, "protocol": "http",
           "sign_name": "运维告警", "templates": {"alert": "SMS_1"}, "read_timeout": read_timeout,
           "connect_timeout": "500ms", "recipient_limits": [],
           "retry": {"max_attempts": 3, "base_delay": "50ms", "max_delay": "200ms", "jitter": 0}}
    return {
        "channels": {"sms": sms, "email": {"provider": "sandbox"}},
        "recipients": {"alice": {"phone": "+8613800138000", "email": "alice@example.com"},
                       "bob": {"phone": "+8613900139000", "email": "bob@example.com"}},
        "routes": [{"match": {}, "to": list(recipients), "channels": list(channels)}],
        "claim_lease": "1s",
    }


def accept(fleet: InlineFleet, title: str = "DiskFull") -> str:
    txid = fleet.intake.submit(Event(kind="alert", title=title), Source.API).transaction_id
    assert [t for t, _, _ in fleet.publisher.tasks] == [DISPATCH]
    fleet.publisher.tasks.clear()  # the test runs the dispatch itself, as a worker would
    return txid


def test_single_delivery_event_goes_out_within_the_dispatch(make_fleet: MakeFleet,
                                                            sms_fake: FakeDysmsapi) -> None:
    fleet = make_fleet(config(sms_fake))
    txid = accept(fleet)
    assert dispatch(fleet.deps, txid, inline_token("task-1")) == "dispatched"
    assert fleet.publisher.tasks == []  # no deliver task: one Celery task for the whole event
    ledger = fleet.deps.ledger
    (delivery,) = ledger.deliveries(txid)
    assert (delivery.status, delivery.claim_token) == ("sent", "dispatch:task-1")
    assert [m["out_id"] for m in sms_fake.messages] == [delivery.id]
    assert ledger.transaction(txid).status == "delivered"  # type: ignore[union-attr]
    # Every record of the two-task path is still written.
    assert [h["event"] for h in ledger.history(txid)] == ["accepted", "dispatched",
                                                          "status delivered"]
    assert [a["outcome"] for a in ledger.attempts(delivery.id)] == ["sent"]
    assert fleet.redis.zscore("ntf:rcpt:awaiting", delivery.id) is not None
    assert fleet.redis.zcard("ntf:open") == 0 and fleet.redis.zcard("ntf:outbox") == 0
    finished = fleet.redis.hgetall("ntf:m:notifier_transactions_finished")
    assert finished == {b'["delivered"]': b"1"}
    sent = fleet.redis.hgetall("ntf:m:notifier_deliveries")
    assert sent == {b'["sms", "aliyun", "sent"]': b"1"}


def test_multi_delivery_event_queues_the_rest(make_fleet: MakeFleet,
                                              sms_fake: FakeDysmsapi) -> None:
    fleet = make_fleet(config(sms_fake, channels=("sms", "email"), recipients=("alice", "bob")))
    txid = accept(fleet)
    dispatch(fleet.deps, txid, inline_token("task-1"))
    alice_sms, alice_email, bob_sms, bob_email = fleet.deps.ledger.deliveries(txid)
    # Both SMS went out here, in one SendSms; each email is a task of its own.
    assert [(d.channel, d.recipient, d.status) for d in (alice_sms, bob_sms)] == [
        ("sms", "alice", "sent"), ("sms", "bob", "sent")]
    assert [m["out_id"] for m in sms_fake.messages] == [alice_sms.sent_as] * 2
    assert alice_sms.sent_as == bob_sms.sent_as and alice_sms.sent_as.startswith(f"{alice_sms.id}+1.")
    assert sorted(tuple(args) for task, args, _ in fleet.publisher.tasks if task == DELIVER) == [
        (alice_email.id,), (bob_email.id,)]
    assert {r.status for r in (alice_email, bob_email)} == {"queued"}
    assert fleet.deps.ledger.transaction(txid).status == "dispatching"  # type: ignore[union-attr]
    fleet.drain()
    assert fleet.deps.ledger.transaction(txid).status == "delivered"  # type: ignore[union-attr]
    assert len(sms_fake.messages) == 2


def test_worker_without_the_channels_queue_queues_everything(make_fleet: MakeFleet,
                                                            sms_fake: FakeDysmsapi) -> None:
    fleet = make_fleet(config(sms_fake))
    txid = accept(fleet)
    dispatch(fleet.deps, txid, inline_token("task-1"), may_inline=lambda q: q != "notifier.sms")
    assert [(t, q) for t, _, q in fleet.publisher.tasks] == [(DELIVER, "notifier.sms")]
    assert sms_fake.messages == []
    fleet.drain()
    assert fleet.deps.ledger.transaction(txid).status == "delivered"  # type: ignore[union-attr]


def test_redelivered_dispatch_after_the_send_neither_resends_nor_republishes(
        make_fleet: MakeFleet, sms_fake: FakeDysmsapi) -> None:
    fleet = make_fleet(config(sms_fake, channels=("sms", "email")))
    txid = accept(fleet)
    dispatch(fleet.deps, txid, inline_token("task-1"))
    queued = list(fleet.publisher.tasks)
    fleet.publisher.tasks.clear()
    dispatch(fleet.deps, txid, inline_token("task-1"))  # the ack was lost: same message again
    assert fleet.publisher.tasks == queued  # the email, still queued, is queued again
    assert len(sms_fake.messages) == 1
    fleet.drain()
    assert fleet.deps.ledger.transaction(txid).status == "delivered"  # type: ignore[union-attr]
    assert len(sms_fake.messages) == 1


def test_another_dispatch_of_the_same_event_leaves_a_live_send_alone(
        make_fleet: MakeFleet, sms_fake: FakeDysmsapi) -> None:
    fleet = make_fleet({**config(sms_fake), "claim_lease": "60s"})
    txid = accept(fleet)
    dispatch(fleet.deps, txid, inline_token("task-1"), may_inline=lambda _q: False)
    fleet.publisher.tasks.clear()
    (delivery,) = fleet.deps.ledger.deliveries(txid)
    fleet.deps.ledger.claim(delivery.id, "another-worker", lease=60)  # mid-send elsewhere
    # e.g. the outbox sweep's re-publish: a new message, so a new token
    dispatch(fleet.deps, txid, inline_token("task-2"))
    assert sms_fake.messages == [] and fleet.publisher.tasks == []
    assert fleet.deps.ledger.delivery(delivery.id).claim_token == "another-worker"  # type: ignore[union-attr]


def _dispatch_in_child(redis_url: str, cfg: dict[str, Any], txids: list[str], token: str) -> None:
    """A worker process: dispatch one message (and send inline) until the test kills it."""
    fleet = InlineFleet(redis_url, cfg, ENV)
    dispatch_all(fleet.deps, txids, token)


def kill_mid_send(redis_url: str, cfg: dict[str, Any], txids: list[str], token: str,
                  sms_fake: FakeDysmsapi, *, provider_has_it: bool, in_flight: int = 1) -> None:
    """Run the dispatch in its own process and SIGKILL it while its `in_flight`-th provider
    call is open (the ones before it were answered)."""
    ctx = multiprocessing.get_context("spawn")
    child = ctx.Process(target=_dispatch_in_child, args=(redis_url, cfg, txids, token))
    child.start()
    try:
        if provider_has_it:
            wait_until(lambda: len(sms_fake.messages) == in_flight, timeout=30)
        else:
            wait_until(lambda: sms_fake.requests["SendSms"] + sms_fake.requests["SendBatchSms"]
                       == in_flight, timeout=30)
        assert child.pid is not None
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.join(10)
    assert child.exitcode == -signal.SIGKILL


@pytest.mark.parametrize("provider_has_it", [True, False], ids=["accepted", "lost"])
def test_dispatch_redelivered_after_a_kill_mid_inline_send(
        make_fleet: MakeFleet, sms_fake: FakeDysmsapi, redis_url: str,
        provider_has_it: bool) -> None:
    cfg = {**config(sms_fake, read_timeout="10s"), "claim_lease": "60s"}
    fleet = make_fleet(cfg)
    txid = accept(fleet)
    # stall: the fake records the SMS, then answers late; hang: it records nothing
    sms_fake.script({"kind": "stall" if provider_has_it else "hang", "seconds": 20})
    kill_mid_send(redis_url, cfg, [txid], inline_token("task-1"), sms_fake,
                  provider_has_it=provider_has_it)
    (delivery,) = fleet.deps.ledger.deliveries(txid)
    assert (delivery.status, delivery.claim_token) == ("sending", "dispatch:task-1")
    # Celery puts the message back (reject_on_worker_lost); the same task id comes again.
    dispatch(fleet.deps, txid, inline_token("task-1"))
    (delivery,) = fleet.deps.ledger.deliveries(txid)
    outcomes = [a["outcome"] for a in fleet.deps.ledger.attempts(delivery.id)]
    assert outcomes == (["found_after_timeout"] if provider_has_it else ["sent"])
    assert delivery.status == "sent" and len(sms_fake.messages) == 1
    assert fleet.deps.ledger.transaction(txid).status == "delivered"  # type: ignore[union-attr]
    assert fleet.publisher.tasks == [] and fleet.redis.zcard("ntf:open") == 0


def accept_together(fleet: InlineFleet, *titles: str) -> tuple[list[str], list[str]]:
    """Accept events in one script call, as the API does with concurrent webhooks ->
    (the transactions answered, the transactions the one dispatch message names)."""
    calls = [fleet.intake.prepare(Event(kind="alert", title=t), Source.ALERTMANAGER,
                                  dedup_key=f"group-{t}") for t in titles]
    answered = [r.transaction_id for r in fleet.deps.ledger.accept(fleet.intake.script_call(calls))]
    fleet.take_queued_dispatches()
    [(task, named, _)] = fleet.publisher.tasks
    fleet.publisher.tasks.clear()
    assert task == DISPATCH
    return answered, named


def test_one_message_for_a_batch_sends_each_event_once(make_fleet: MakeFleet,
                                                       sms_fake: FakeDysmsapi) -> None:
    fleet = make_fleet(config(sms_fake))
    answered, named = accept_together(fleet, "A", "B", "A")  # the second A: a duplicate
    assert answered[2] == answered[0] and len(named) == 3
    assert dispatch_all(fleet.deps, named, inline_token("task-1")) == ["dispatched", "dispatched",
                                                                      "missing"]
    assert fleet.publisher.tasks == []  # no deliver task: one Celery task for the batch
    assert sorted(m["out_id"] for m in sms_fake.messages) == sorted(
        d.id for txid in answered[:2] for d in fleet.deps.ledger.deliveries(txid))
    # the ack was lost: the same message again sends nothing more
    assert dispatch_all(fleet.deps, named, inline_token("task-1")) == ["done", "done", "missing"]
    assert len(sms_fake.messages) == 2


# Ways a stored transaction can become unreadable (a damaged row, a schema that moved on), and
# what reading it raises.
DAMAGE = {
    "JSONDecodeError": {"event": '{"kind": "alert", "title": 7'},
    "AttributeError": {"event": json.dumps({"kind": "alert", "title": "t", "labels": []})},
    "RecursionError": {"event": "[" * 100_000},
    "ValueError": {"status": "garbled"},
}


@pytest.mark.parametrize("error", list(DAMAGE))
def test_an_unreadable_event_fails_alone_and_the_rest_of_its_message_goes_out(
        make_fleet: MakeFleet, sms_fake: FakeDysmsapi, error: str) -> None:
    # Stored events are validated when accepted, so this takes a damaged row or a change of
    # schema; whatever the cause, the other events of the message must still be sent.
    fleet = make_fleet(config(sms_fake))
    _, named = accept_together(fleet, "A", "B", "C")
    fleet.redis.hset(f"ntf:tx:{named[1]}", mapping=DAMAGE[error])
    outcomes = dispatch_all(fleet.deps, named, inline_token("task-1"))
    assert outcomes == ["dispatched", "unreadable", "dispatched"]
    ledger = fleet.deps.ledger
    assert [ledger.transaction(t).status for t in (named[0], named[2])] == ["delivered"] * 2  # type: ignore[union-attr]
    assert len(sms_fake.messages) == 2
    assert [t for t, _ in ledger.dead_letters()] == [named[1]]
    assert fleet.redis.hget(f"ntf:tx:{named[1]}", "status") == b"failed"
    assert fleet.redis.zscore("ntf:outbox", named[1]) is None  # the sweep will not resend it
    history = [json.loads(line) for line in fleet.redis.lrange(f"ntf:tx:{named[1]}:log", 0, -1)]
    assert [h["detail"] for h in history if h["event"] == "unreadable"] == [
        f"its stored event cannot be read ({error})"]
    # Its message again (the ack was lost): nothing is sent or written twice. (A garbled status
    # was overwritten by "failed": that transaction reads again, as done.)
    again = "done" if error == "ValueError" else "unreadable"
    assert dispatch_all(fleet.deps, named, inline_token("task-1")) == ["done", again, "done"]
    assert len(sms_fake.messages) == 2 and len(ledger.dead_letters()) == 1
    assert fleet.redis.llen(f"ntf:tx:{named[1]}:log") == len(history)
    if error == "ValueError":
        return
    # `notifier status` shows it; replaying it is refused and leaves the dead letter in place.
    view = transaction_view(ledger, named[1])
    assert view is not None and view["event"] is None and view["status"] == "failed"
    assert f"event: its stored event cannot be read ({error})" in render_timeline(view)
    with pytest.raises(Unreplayable, match="cannot be read"):
        replay_dead_letter(ledger, fleet.intake, named[1])
    assert [t for t, _ in ledger.dead_letters()] == [named[1]]


def test_a_transaction_unreadable_after_its_send_keeps_its_status(make_fleet: MakeFleet,
                                                                  sms_fake: FakeDysmsapi) -> None:
    # Delivered, then damaged: a redelivered message must not turn it into a failure.
    fleet = make_fleet(config(sms_fake))
    _, named = accept_together(fleet, "A", "B")
    assert dispatch_all(fleet.deps, named, inline_token("task-1")) == ["dispatched", "dispatched"]
    fleet.redis.hset(f"ntf:tx:{named[0]}", "event", "{")
    assert dispatch_all(fleet.deps, named, inline_token("task-1")) == ["unreadable", "done"]
    assert fleet.redis.hget(f"ntf:tx:{named[0]}", "status") == b"delivered"
    assert fleet.deps.ledger.dead_letters() == [] and len(sms_fake.messages) == 2
    fleet.redis.hset(f"ntf:tx:{named[0]}", "created_at", "garbled")  # the row itself, too
    view = transaction_view(fleet.deps.ledger, named[0])
    assert view is not None and view["status"] == "delivered" and view["history"] == []


def test_a_delivery_queued_before_its_transaction_became_unreadable_fails_once(
        make_fleet: MakeFleet, sms_fake: FakeDysmsapi) -> None:
    # Fanned out by one version, its deliver task run by one that cannot read it (or damage in
    # between): the delivery must end, not fail at every attempt until retention.
    fleet = make_fleet(config(sms_fake))
    txid = accept(fleet)
    assert dispatch(fleet.deps, txid) == "dispatched"  # no token: the delivery is queued
    assert [t for t, _, _ in fleet.publisher.tasks] == [DELIVER]
    fleet.redis.hset(f"ntf:tx:{txid}", "event", "{")
    fleet.drain()
    (delivery,) = fleet.deps.ledger.deliveries(txid)
    assert delivery.status == "failed" and "cannot be read (JSONDecodeError)" in delivery.reason
    assert sms_fake.messages == [] and fleet.publisher.tasks == []
    assert fleet.redis.hget(f"ntf:tx:{txid}", "status") == b"failed"
    assert [t for t, _ in fleet.deps.ledger.dead_letters()] == [txid]
    assert fleet.redis.zcard("ntf:open") == 0  # nothing left for the reaper to requeue


def test_a_digest_goes_without_a_member_that_became_unreadable(make_fleet: MakeFleet,
                                                               sms_fake: FakeDysmsapi) -> None:
    fleet = make_fleet(config(sms_fake))
    _, named = accept_together(fleet, "A", "B")
    dispatch_all(fleet.deps, named, None)
    members = [fleet.deps.ledger.deliveries(t)[0].id for t in named]
    fleet.redis.hset(f"ntf:tx:{named[1]}", "event", "{")
    digest = DeliveryRecord(id=f"{named[0]}.dg-1", transaction_id=named[0], channel="sms",
                            recipient="alice", address="+8613800138000", kind="digest",
                            digest_of=members)
    assert [e.title for e in _digest_events(fleet.deps, digest)] == ["A"]


def test_a_batch_past_its_time_budget_requeues_the_rest_as_one_message(
        make_fleet: MakeFleet, sms_fake: FakeDysmsapi) -> None:
    fleet = make_fleet(config(sms_fake))
    _, named = accept_together(fleet, "A", "B", "C")
    assert dispatch_all(fleet.deps, named, inline_token("task-1"), budget=0.0) == ["dispatched"]
    assert fleet.publisher.tasks == [(DISPATCH, named[1:], "notifier.dispatch")]
    assert len(sms_fake.messages) == 1
    fleet.drain()
    assert [fleet.deps.ledger.transaction(t).status for t in named] == ["delivered"] * 3  # type: ignore[union-attr]
    assert len(sms_fake.messages) == 3


def test_a_batch_redelivered_after_a_kill_mid_way_resends_nothing(
        make_fleet: MakeFleet, sms_fake: FakeDysmsapi, redis_url: str) -> None:
    cfg = {**config(sms_fake, read_timeout="10s"), "claim_lease": "60s"}
    fleet = make_fleet(cfg)
    _, named = accept_together(fleet, "A", "B", "C")
    # the first SendSms is answered; the second is recorded by the provider, then answered late
    sms_fake.script({"kind": "ok"}, {"kind": "stall", "seconds": 20})
    kill_mid_send(redis_url, cfg, named, inline_token("task-1"), sms_fake, provider_has_it=True,
                  in_flight=2)
    statuses = [[d.status for d in fleet.deps.ledger.deliveries(t)] for t in named]
    # all three were fanned out (one round trip) before the first send; the third not sent yet
    assert statuses == [["sent"], ["sending"], ["queued"]]
    assert dispatch_all(fleet.deps, named, inline_token("task-1")) == ["done", "dispatched",
                                                                      "dispatched"]
    attempts = [[a["outcome"] for a in fleet.deps.ledger.attempts(fleet.deps.ledger.deliveries(t)[0].id)]
                for t in named]
    assert attempts == [["sent"], ["found_after_timeout"], ["sent"]]
    assert len(sms_fake.messages) == 3  # each event reached the provider exactly once
    assert [fleet.deps.ledger.transaction(t).status for t in named] == ["delivered"] * 3  # type: ignore[union-attr]


def test_reaper_rescues_an_inline_send_whose_worker_died(make_fleet: MakeFleet,
        sms_fake: FakeDysmsapi, redis_url: str) -> None:
    cfg = config(sms_fake, read_timeout="10s")
    fleet = make_fleet(cfg)
    fleet.deps.claim_lease = 1.0  # as the worker's runtime sets it from the config
    txid = accept(fleet)
    sms_fake.script({"kind": "stall", "seconds": 20})
    kill_mid_send(redis_url, cfg, [txid], inline_token("task-1"), sms_fake, provider_has_it=True)
    ledger = fleet.deps.ledger
    # The whole worker is gone (no redelivery before the visibility timeout): the reaper.
    assert reap(ledger, fleet.publisher, stale_after=60, lease=60) == []
    time.sleep(1.2)
    (delivery,) = ledger.deliveries(txid)
    assert reap(ledger, fleet.publisher, stale_after=1, lease=1) == [delivery.id]
    fleet.drain()
    (delivery,) = ledger.deliveries(txid)
    assert [a["outcome"] for a in ledger.attempts(delivery.id)] == ["found_after_timeout"]
    assert len(sms_fake.messages) == 1
    assert ledger.transaction(txid).status == "delivered"  # type: ignore[union-attr]


# ---- the channel's pooled connection ---------------------------------------------------------


def message(delivery_id: str) -> Outgoing:
    return Outgoing(delivery_id=delivery_id, transaction_id="tx-1", address="+8613800138000",
                    kind="alert", rendered=Rendered(subject="", text="", params={"t": "x"}),
                    data={})


def test_sends_reuse_one_connection_and_a_forked_child_opens_its_own(
        make_fleet: MakeFleet, sms_fake: FakeDysmsapi) -> None:
    fleet = make_fleet(config(sms_fake))
    channel = fleet.deps.providers["sms"][0]
    assert isinstance(channel, AliyunSms)
    for i in range(5):
        fleet.loop.run(channel.send(message(f"dlv-{i}")))
    assert len(sms_fake.messages) == 5
    assert connections_made(sms_fake.endpoint) == 1  # keep-alive: one TCP connection for five SendSms
    parent_sessions = dict(DaraCore._sessions)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: nothing of the parent's pool, and a send of its own works
        ok = not DaraCore._sessions
        try:
            fleet.loop.run(channel.send(message("dlv-child")))
            ok = ok and connections_made(sms_fake.endpoint) == 1
        except Exception:
            ok = False
        os.write(write, b"1" if ok else b"0")
        os._exit(0)
    os.close(write)
    assert os.read(read, 1) == b"1"
    os.waitpid(pid, 0)
    os.close(read)
    assert DaraCore._sessions == parent_sessions  # the parent keeps its own connection
    fleet.loop.run(channel.send(message("dlv-after")))
    assert [m["out_id"] for m in sms_fake.messages][-2:] == ["dlv-child", "dlv-after"]
    assert connections_made(sms_fake.endpoint) == 1  # the parent's connection outlived the child


def connections_made(endpoint: str) -> int:
    """TCP connections this process's SDK pool opened to `endpoint` (urllib3 counts them)."""
    (session,) = [v for k, v in DaraCore._sessions.items() if f"//{endpoint}:" in k]
    pools = session.get_adapter(f"http://{endpoint}/").poolmanager.pools._container.values()
    return sum(int(p.num_connections) for p in pools if f"{p.host}:{p.port}" == endpoint)
