"""Storm digests on a real redis-server with real providers (sandbox, the Dysmsapi fake),
driven task by task without Celery: what a digest carries is sent once, and every member ends
(reached, fallen back along its own route, or failed and dead-lettered) whatever happens to the
digest or its worker."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from notifier.breaker import FleetBreaker
from notifier.channels.sandbox import outbox_key
from notifier.ledger_counts import count_delivery
from notifier.ledger_keys import DEADLETTERS
from notifier.models import Event, Source
from notifier.pipeline.deliver import deliver_batch
from notifier.pipeline.digest import flush
from notifier.pipeline.dispatch import dispatch_all
from notifier.pipeline.reaper import reap
from notifier.receipts import FAILED_CLASS, Report, apply_report
from notifier.tasks_spec import DELIVER, DIGEST
from tests.fakes.dysmsapi import FakeDysmsapi
from tests.fakes.fcm import FakeFcm
from tests.integration.conftest import SMS_ENV, MakeFleet
from tests.support.counters import counts
from tests.support.inline import InlineFleet

ALICE = {"phone": "+8613800138000", "email": "alice@example.com"}


def aliyun(fake: FakeDysmsapi, limit: dict[str, Any]) -> dict[str, Any]:
    return {"provider": "aliyun", "endpoint": fake.endpoint, "protocol": "http",
            "sign_name": "运维告警", "templates": {"alert": "SMS_1", "digest": "SMS_9"},
            "read_timeout": "500ms", "connect_timeout": "500ms", "recipient_limits": [limit]}


def sandbox_config(**recipient: Any) -> dict[str, Any]:
    """SMS to alice at most 1 a second (the rest held for a digest), email as fallback."""
    return {
        "channels": {"sms": {"provider": "sandbox",
                             "recipient_limits": [{"rate": 1, "per": "1s", "burst": 1}]},
                     "email": {"provider": "sandbox"}},
        "recipients": {"alice": {**ALICE, **recipient}},
        "routes": [{"match": {}, "to": ["alice"], "channels": ["sms"], "fallback": ["email"]}],
    }


def submit(fleet: InlineFleet, title: str, severity: str = "critical") -> str:
    event = Event(kind="alert", title=title, severity=severity)
    return fleet.intake.submit(event, Source.API).transaction_id


def outbox(fleet: InlineFleet, channel: str) -> list[str]:
    return [json.dumps(json.loads(x), ensure_ascii=False)
            for x in fleet.redis.lrange(outbox_key(channel), 0, -1)]


def tx_statuses(fleet: InlineFleet, txids: list[str]) -> dict[str, str]:
    return {t: fleet.deps.ledger.transaction(t).status for t in txids}  # type: ignore[union-attr]


def test_a_merged_delivery_is_not_sent_on_its_own_as_well(make_fleet: MakeFleet) -> None:
    fleet = make_fleet(sandbox_config())
    txids = [submit(fleet, f"alert-{i}") for i in range(3)]
    fleet.drain()  # alert-0 goes out, alert-1 and alert-2 are held for a digest
    time.sleep(1.2)
    # The digest timer fires, but its task waits behind a backlog; meanwhile the reaper finds
    # the held deliveries overdue and re-queues them, behind the digest task.
    for timer in fleet.deps.timers.due(time.time()):
        fleet.publisher.publish(timer.task, [timer.arg], timer.queue)
        fleet.deps.timers.done(timer)
    assert [task for task, _args, _queue in fleet.publisher.tasks] == [DIGEST]
    reap(fleet.deps.ledger, fleet.publisher, stale_after=0.0, lease=120.0)
    fleet.drain(timers_until=4)
    sent = outbox(fleet, "sms")
    assert len(sent) == 2, sent  # alert-0, then one digest of alert-1 and alert-2
    for title in ("alert-1", "alert-2"):
        assert sum(title in text for text in sent) == 1, (title, sent)
    assert set(tx_statuses(fleet, txids).values()) == {"delivered"}
    merged = [d for t in txids[1:] for d in fleet.deps.ledger.deliveries(t) if not d.digest_of]
    assert {(d.status, bool(d.digest_id)) for d in merged} == {("suppressed", True)}
    # alert-0 and the digest sent, its members counted as carried by it
    assert counts(fleet.redis, "notifier_deliveries") == {"sent": 2.0, "suppressed": 2.0}


def merged_into_a_digest(fleet: InlineFleet) -> tuple[list[str], list[str]]:
    """alert-0 goes out, alert-1 and alert-2 are merged into a digest whose task is not run
    yet. -> (the three transactions, the digest's task args)."""
    txids = [submit(fleet, f"alert-{i}") for i in range(3)]
    fleet.drain()
    time.sleep(1.2)
    (timer,) = fleet.deps.timers.due(time.time())
    fleet.deps.timers.done(timer)
    assert flush(fleet.deps, timer.arg) == "digest of 2"
    (digest_task,) = [args for task, args, _queue in fleet.publisher.tasks if task == DELIVER]
    fleet.publisher.tasks.clear()
    return txids, digest_task


def test_a_drill_message_is_never_merged_into_a_digest(make_fleet: MakeFleet) -> None:
    """A drill SMS held back by the person's limit goes out on its own once the limit allows,
    with its reply code: merged into a digest ("2 alerts: DiskFull×1 DR drill…×1") the code
    was lost, so the operator could not confirm and was reported silent."""
    fleet = make_fleet(sandbox_config())
    txids = [submit(fleet, "first"), submit(fleet, "DiskFull")]
    drill = Event(kind="drill", title="DR drill: switch", to=("alice",),
                  extra={"reply_code": "4711", "drill_name": "DR drill", "phase": "switch"})
    drill_tx = fleet.intake.submit(drill, Source.DRILL).transaction_id
    fleet.drain(timers_until=6)
    (sms,) = [m for m in outbox(fleet, "sms") if drill_tx in m]
    assert '"kind": "drill"' in sms and "4711" in sms
    assert [d.status for d in fleet.deps.ledger.deliveries(drill_tx)] == ["sent"]
    assert set(tx_statuses(fleet, [*txids, drill_tx]).values()) == {"delivered"}


def test_a_failed_receipt_for_a_sent_digest_fails_its_alerts(make_fleet: MakeFleet) -> None:
    """The digest went out, so its alerts were settled as carried; then its receipt says the
    phone never got it, and there is no fallback: those alerts reached nobody and must show
    failed (and be dead letters to replay), not delivered."""
    config = sandbox_config()
    config["routes"][0]["fallback"] = []
    fleet = make_fleet(config)
    txids, digest_task = merged_into_a_digest(fleet)
    assert deliver_batch(fleet.deps, digest_task, "task-1") == ["sent"]
    assert set(tx_statuses(fleet, txids).values()) == {"delivered"}
    digest = fleet.deps.ledger.delivery(digest_task[0])
    assert digest is not None
    report = Report(phone=ALICE["phone"], biz_id=digest.provider_message_id, out_id=digest.id,
                    success=False, err_code="UNDELIV", err_msg="undelivered")
    assert apply_report(fleet.deps, report) == "failed"
    members = txids[1:]
    assert set(tx_statuses(fleet, members).values()) == {"failed"}
    assert all(fleet.redis.zscore(DEADLETTERS, t) is not None for t in members)
    # Counted again under failed, and once under suppressed in the revisions (see metrics.md).
    counted = {k: counts(fleet.redis, k) for k in ("notifier_deliveries", "notifier_deliveries_revised")}
    assert counted == {"notifier_deliveries": {"sent": 2.0, "suppressed": 2.0, "failed": 3.0},
                       "notifier_deliveries_revised": {"sent": 1.0, "suppressed": 2.0}}, counted
    assert apply_report(fleet.deps, report) in ("duplicate", "stale")  # again: nothing moves
    assert {k: counts(fleet.redis, k) for k in counted} == counted


def test_a_failed_receipt_for_a_sent_digest_whose_worker_died_still_fails_its_alerts(
        make_fleet: MakeFleet) -> None:
    """As above, but the receipt's worker is killed after the digest's own failure is written
    (its status and count, no fallback left) and before its members are settled: the receipt
    applied again must settle them, not find the digest failed and leave them delivered."""
    config = sandbox_config()
    config["routes"][0]["fallback"] = []
    fleet = make_fleet(config)
    txids, digest_task = merged_into_a_digest(fleet)
    assert deliver_batch(fleet.deps, digest_task, "task-1") == ["sent"]
    digest = fleet.deps.ledger.delivery(digest_task[0])
    assert digest is not None
    # The ledger as the killed worker leaves it: the receipt's write, then fall_back's (failed).
    pipe = fleet.redis.pipeline()
    fleet.deps.ledger.update(digest.id, into=pipe, status="failed", error_class=FAILED_CLASS,
                             error_code="UNDELIV", reason="receipt_failed: UNDELIV")
    count_delivery(pipe, digest.id, channel="sms", provider=digest.provider, outcome="failed")
    pipe.execute()
    report = Report(phone=ALICE["phone"], biz_id=digest.provider_message_id, out_id=digest.id,
                    success=False, err_code="UNDELIV", err_msg="undelivered")
    apply_report(fleet.deps, report)  # the stored receipt, claimed again after the lease
    members = txids[1:]
    assert set(tx_statuses(fleet, members).values()) == {"failed"}
    assert all(fleet.redis.zscore(DEADLETTERS, t) is not None for t in members)


def digest_sent_by_a_worker_then_killed(fleet: InlineFleet) -> tuple[list[str], list[str]]:
    """The digest's send is recorded and its worker is killed (SIGKILL, OOM) right then, before
    settling anything: the ledger as that worker leaves it."""
    txids, digest_task = merged_into_a_digest(fleet)
    (digest_id,) = digest_task
    fleet.deps.ledger.update(digest_id, status="sent", provider="sandbox")
    assert tx_statuses(fleet, txids[1:]) == {t: "dispatching" for t in txids[1:]}
    return txids, digest_task


def test_members_of_a_sent_digest_end_when_its_task_is_redelivered(make_fleet: MakeFleet
                                                                   ) -> None:
    fleet = make_fleet(sandbox_config())
    txids, digest_task = digest_sent_by_a_worker_then_killed(fleet)
    sent = outbox(fleet, "sms")
    # The message is redelivered (acks late): it finds the digest sent and settles its members.
    assert deliver_batch(fleet.deps, digest_task, "task-1") == ["done"]
    assert set(tx_statuses(fleet, txids).values()) == {"delivered"}
    assert outbox(fleet, "sms") == sent  # nothing sent again
    assert fleet.redis.zcard("ntf:open") == 0


def test_the_reaper_settles_the_members_of_a_digest_whose_worker_was_killed(
        make_fleet: MakeFleet) -> None:
    fleet = make_fleet(sandbox_config())
    txids, _lost_with_the_worker = digest_sent_by_a_worker_then_killed(fleet)
    sent = outbox(fleet, "sms")
    for _ in range(2):  # a second pass finds nothing left to do
        reap(fleet.deps.ledger, fleet.publisher, stale_after=0.0, lease=0.0)
        fleet.drain()
    assert set(tx_statuses(fleet, txids).values()) == {"delivered"}
    assert counts(fleet.redis, "notifier_deliveries")["suppressed"] == 2.0  # settled once
    assert outbox(fleet, "sms") == sent
    assert fleet.redis.zcard("ntf:open") == 0


def test_a_refused_digest_goes_on_as_a_digest_beside_a_members_own_fallback(
        make_fleet: MakeFleet, sms_fake: FakeDysmsapi) -> None:
    cfg: dict[str, Any] = {
        "channels": {"sms": aliyun(sms_fake, {"rate": 1, "per": "2s", "burst": 1}),
                     "push": {"provider": "sandbox"}, "email": {"provider": "sandbox"}},
        "recipients": {"alice": {**ALICE, "push_tokens": ["stale-token"]}},
        # DESIGN.md's critical route: sms + push, email as the fallback
        "routes": [{"match": {}, "to": ["alice"], "channels": ["sms", "push"],
                    "fallback": ["email"]}],
    }
    fleet = make_fleet(cfg, SMS_ENV)
    # alice's push never works (the breaker open stands in for a stale token): every push of
    # hers goes on by email, so the digest's first member has a live email already
    push = fleet.deps.providers["push"][0]
    FleetBreaker(fleet.redis, push.breaker_name, fleet.settings.channels["push"].breaker
                 ).force_open("test", "stale token")
    sms_fake.script({"kind": "ok"}, {"kind": "business", "code": "isv.SMS_CONTENT_ILLEGAL"})
    txids = [submit(fleet, f"alert-{i}") for i in range(3)]
    fleet.drain(timers_until=5)
    assert set(tx_statuses(fleet, txids).values()) == {"delivered"}
    (digest_email,) = [text for text in outbox(fleet, "email") if '"digest"' in text]
    assert "alert-1" in digest_email and "alert-2" in digest_email
    assert fleet.redis.zcard("ntf:open") == 0


def test_each_route_keeps_its_fallback_when_held_alerts_are_refused(
        make_fleet: MakeFleet, sms_fake: FakeDysmsapi) -> None:
    cfg: dict[str, Any] = {
        "channels": {"sms": aliyun(sms_fake, {"rate": 1, "per": "1s", "burst": 1}),
                     "email": {"provider": "sandbox"}},
        "recipients": {"alice": ALICE},
        "routes": [
            {"match": {"severity": "critical"}, "to": ["alice"], "channels": ["sms"],
             "fallback": ["email"]},
            {"match": {}, "to": ["alice"], "channels": ["sms"]},
        ],
    }
    fleet = make_fleet(cfg, SMS_ENV)
    # The first SMS goes out; then alice's number hits Aliyun's day window (recipient_budget).
    limited = {"kind": "business", "code": "isv.BUSINESS_LIMIT_CONTROL",
               "message": "触发天级流控Permits:10"}
    sms_fake.script({"kind": "ok"}, limited, limited)
    submit(fleet, "first", "warning")
    warnings = [submit(fleet, f"disk {n}%", "warning") for n in (80, 90)]
    criticals = [submit(fleet, title) for title in ("DB DOWN", "API DOWN")]
    fleet.drain(timers_until=5)
    # The critical alerts reach alice by email, as their route says; the warnings' route has
    # no fallback: they fail, and are dead letters.
    (email,) = outbox(fleet, "email")
    assert "DB DOWN" in email and "API DOWN" in email and "disk" not in email
    assert tx_statuses(fleet, criticals) == {t: "delivered" for t in criticals}
    assert tx_statuses(fleet, warnings) == {t: "failed" for t in warnings}
    assert set(warnings) <= {t for t, _at in fleet.deps.ledger.dead_letters()}
    assert len(sms_fake.messages) == 1  # the first alert only


def test_a_digest_one_of_two_push_tokens_reached_fails_none_of_its_alerts(
        make_fleet: MakeFleet, sms_fake: FakeDysmsapi, tmp_path: Path) -> None:
    with FakeFcm(project_id="demo") as fcm:
        key = tmp_path / "sa.json"
        fcm.write_service_account(key)
        fcm.unregister("tok-dead")
        cfg: dict[str, Any] = {
            "channels": {"sms": aliyun(sms_fake, {"rate": 1, "per": "1s", "burst": 1}),
                         "push": {"provider": "fcm", "project_id": "demo",
                                  "endpoint": fcm.url, "credentials_file": str(key)}},
            "recipients": {"alice": {**ALICE, "push_tokens": ["tok-dead", "tok-live"]}},
            "routes": [{"match": {}, "to": ["alice"], "channels": ["sms"],
                        "fallback": ["push"]}],
        }
        fleet = make_fleet(cfg, SMS_ENV)
        # alert-0 goes out by SMS; the digest of alert-1 and alert-2 is refused by Aliyun
        sms_fake.script({"kind": "ok"}, {"kind": "business", "code": "isv.SMS_CONTENT_ILLEGAL"})
        txids = [submit(fleet, f"alert-{i}") for i in range(3)]
        fleet.drain(timers_until=5)
        time.sleep(0.2)
        fleet.drain(timers_until=1)
        delivered_to = [m["message"]["token"] for m in fcm.messages]
        # the digest reached alice's live phone ...
        assert delivered_to == ["tok-live"], delivered_to
        shown = {t: [(d.id.split(".", 1)[-1], d.channel, d.status)
                     for d in fleet.deps.ledger.deliveries(t)] for t in txids}
        dead = {t for t, _at in fleet.deps.ledger.dead_letters()}
        # ... so its alerts were reached, not failed and listed for an operator to replay (which
        # would page twice)
        statuses = tx_statuses(fleet, txids[1:])
        assert "failed" not in statuses.values(), (statuses, shown)
        assert not (set(txids[1:]) & dead), (dead, shown)


def test_members_of_a_digest_an_older_version_fell_back_as_carried_go_out_on_their_own(
        make_fleet: MakeFleet) -> None:
    fleet = make_fleet(sandbox_config())
    txids, digest_task = merged_into_a_digest(fleet)
    (digest_id,) = digest_task
    # What the previous version wrote when the digest was refused and a live email of its
    # first member's transaction was found: fallen back "carried by" it, rolled up, closed.
    ledger = fleet.deps.ledger
    ledger.update(digest_id, status="fallen_back", reason="permanent (carried by x.f0)",
                  next_at=None)
    ledger.close_open(digest_id)
    for _ in range(3):  # sweeps and redeliveries of the digest's task after the upgrade
        time.sleep(0.05)
        reap(ledger, fleet.publisher, stale_after=0.0, lease=0.0)
        fleet.publisher.publish(DELIVER, digest_task, "sms")
        fleet.drain(timers_until=1.5)
    members = {t: [(d.status, d.digest_id) for d in ledger.deliveries(t)] for t in txids[1:]}
    assert set(tx_statuses(fleet, txids).values()) == {"delivered"}, members
    sent = outbox(fleet, "sms")
    assert len(sent) == 3 and all(sum(f"alert-{i}" in m for m in sent) == 1 for i in range(3))


def test_an_alert_held_while_its_digest_timer_is_being_fired_keeps_a_timer(
        make_fleet: MakeFleet) -> None:
    """The scheduler publishes a digest timer's task and removes the timer after; a worker that
    holds another alert for the same person in between found the timer still set and left it,
    so the removal took that alert's timer too: it waited for the reaper, a minute late."""
    fleet = make_fleet(sandbox_config())
    txids = [submit(fleet, f"alert-{i}") for i in range(3)]
    fleet.drain()  # alert-0 goes out, alert-1 and alert-2 are held for a digest
    time.sleep(1.2)
    [timer] = fleet.deps.timers.due(time.time())  # the scheduler reads the due digest timer
    fleet.publisher.publish(timer.task, [timer.arg], timer.queue)  # and publishes its task
    txids.append(submit(fleet, "alert-3"))
    while fleet.publisher.tasks:  # the workers run the digest, then alert-3 is held
        task, args, _queue = fleet.publisher.tasks.pop(0)
        if task == DIGEST:
            flush(fleet.deps, args[0])
        elif task == DELIVER:
            deliver_batch(fleet.deps, args, f"task-{task}-{args[0]}")
        else:
            dispatch_all(fleet.deps, args)
    [held] = fleet.deps.ledger.deliveries(txids[3])
    assert held.status == "deferred"
    fleet.deps.timers.done(timer)  # the scheduler's removal of what it fired
    fleet.drain(timers_until=4)
    assert sum("alert-3" in text for text in outbox(fleet, "sms")) == 1
    assert set(tx_statuses(fleet, txids).values()) == {"delivered"}
