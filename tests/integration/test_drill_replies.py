"""Operator replies (Aliyun SmsUp) on a real redis-server, through the callback and the reply
inbox, pipeline inline (no Celery): bare mainland numbers, batches with a bad record, and
replies judged at the instant they arrived rather than when a worker got to them."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from notifier.api.app import create_app
from notifier.config import settings_from_mapping
from notifier.drills.escalation import fire_drill_timer
from notifier.drills.model import DrillSpec
from notifier.drills.replies import INBOX, REJECTED, Reply, apply_due, reply_inbox, store_replies
from notifier.drills.report import build_report
from notifier.drills.service import DrillService
from notifier.inbox import Inbox
from tests.integration.conftest import MakeFleet
from tests.integration.test_drill_flow import CONFIG as FLOW_CONFIG
from tests.integration.test_drill_flow import SPEC
from tests.support.counters import counts
from tests.support.inline import InlineFleet

UP = "/v1/callbacks/aliyun/sms-up"
ALICE, BOB = "+8615012345678", "+8613900139000"  # alice: a 150 number, also valid as +1 501...
# test_drill_flow's fleet, alice on a 150 number
CONFIG: dict[str, Any] = {**FLOW_CONFIG, "recipients": {
    **FLOW_CONFIG["recipients"], "alice": {"phone": ALICE, "email": "alice@example.com"}}}
assert CONFIG["recipients"]["bob"]["phone"] == BOB


@pytest.fixture
def fleet(make_fleet: MakeFleet) -> InlineFleet:
    return make_fleet(CONFIG)


@pytest.fixture
def svc(fleet: InlineFleet) -> DrillService:
    return DrillService(fleet.settings, fleet.redis, fleet.intake, fleet.deps.ledger,
                        fleet.deps.timers)


@pytest.fixture
def api(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    monkeypatch.delenv("NOTIFIER_CALLBACK_TOKEN", raising=False)
    with TestClient(create_app(settings_from_mapping({**CONFIG, "redis_url": redis_url}))) as c:
        yield c


def announced(svc: DrillService, **spec: Any) -> tuple[str, dict[str, str]]:
    """A drill with its first phase started and announced; each operator's reply code."""
    drill = svc.create(DrillSpec.model_validate({**SPEC, **spec, "start": True}))
    assert fire_drill_timer(svc, f"{drill.id}:0:0") == "announced"
    codes = {op: svc.store.field(drill.id, f"p0|{op}|code") or "" for op in drill.operators}
    return drill.id, codes


def metric(fleet: InlineFleet, name: str, result: str) -> float:
    return counts(fleet.redis, name).get(result, 0.0)


def up(phone: str, content: str, seq: str) -> dict[str, str]:
    """One SmsUp record, in Aliyun's format."""
    return {"phone_number": phone, "send_time": "2026-11-23 11:52:31", "content": content,
            "dest_code": "1234", "sequence_id": seq}


def test_reply_pushed_with_a_bare_mainland_number_confirms(api: TestClient,
                                                           svc: DrillService) -> None:
    _, codes = announced(svc)
    # Aliyun pushes the sender with or without 86; bare, 150... also reads as +1 501...
    pushed = api.post(UP, json=[up("15012345678", f"{codes['alice']} 确认", "1")])
    assert pushed.status_code == 200, pushed.text
    assert apply_due(svc) == {"confirmed": 1}


def test_one_bad_record_does_not_cost_the_good_replies_of_its_push(
        api: TestClient, svc: DrillService, fleet: InlineFleet,
        caplog: pytest.LogCaptureFixture) -> None:
    drill_id, codes = announced(svc)
    pushed = api.post(UP, json=[
        up("8613900139000", f"{codes['bob']} 确认", "10"),
        up("10690000", "退订", "11"),  # a short code: a reply, from no phone number
        {**up("8615012345678", "x" * 2001, "12")},  # unreadable: far too long
    ])
    assert pushed.status_code == 200, pushed.text
    assert apply_due(svc) == {"confirmed": 1, "bad_number": 1}
    # The short code's reply is on the fleet-wide rejected list, under its documented reason.
    rejected = [json.loads(r) for r in fleet.redis.lrange(REJECTED, 0, -1)]
    assert [(r["reason"], r["sender"]) for r in rejected] == [("bad_number", "****")]
    # The unreadable record is counted and logged, with its sender masked.
    assert metric(fleet, "notifier_replies", "invalid") == 1.0
    (line,) = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert "[2]" in line and "content" in line and "+86150****5678" in line
    assert "15012345678" not in caplog.text and "xxxx" not in caplog.text
    assert svc.store.field(drill_id, "p0|bob|confirmed_at") is not None


def test_a_push_with_no_readable_record_is_refused_naming_the_fields(
        api: TestClient, fleet: InlineFleet) -> None:
    pushed = api.post(UP, json=[{"phone_number": "8613900139000", "sequence_id": "1"}])
    assert pushed.status_code == 422 and "[0].content" in pushed.text
    assert reply_inbox(fleet.redis, 3600).pending() == 0
    assert metric(fleet, "notifier_replies", "invalid") == 1.0


# A reply is judged at the instant it arrived; a worker may apply it seconds or minutes later.

def store(fleet: InlineFleet, phone: str, content: str, seq: str) -> None:
    """What the callback does: the reply is in the inbox, no worker has applied it yet."""
    store_replies(reply_inbox(fleet.redis, 3600), [Reply(phone=phone, content=content,
                                                         sequence_id=seq)])


def test_a_reply_received_while_its_phase_was_live_confirms_after_the_next_phase_started(
        fleet: InlineFleet, svc: DrillService) -> None:
    drill_id, codes = announced(svc)
    store(fleet, ALICE, codes["alice"], "21")
    svc.start_phase(drill_id)  # the lead moves on before a worker got to the reply
    store(fleet, BOB, codes["bob"], "22")  # bob's arrives after that: too late
    assert apply_due(svc) == {"confirmed": 1, "phase_not_live": 1}
    assert svc.store.field(drill_id, "p0|alice|confirmed_at") is not None
    assert svc.store.field(drill_id, "p0|bob|confirmed_at") is None


def test_a_reply_confirms_as_of_when_it_arrived(fleet: InlineFleet, svc: DrillService) -> None:
    drill_id, codes = announced(svc, reply_code_ttl="1s")
    received = time.time()
    store(fleet, ALICE, codes["alice"], "23")
    time.sleep(1.2)  # workers busy for a moment: the code has expired since
    assert apply_due(svc) == {"confirmed": 1}
    confirmed_at = float(svc.store.field(drill_id, "p0|alice|confirmed_at") or 0)
    assert received <= confirmed_at < received + 0.5, f"{confirmed_at - received:.1f} s late"
    store(fleet, BOB, codes["bob"], "24")  # arrives after expiry: rejected
    assert apply_due(svc) == {"expired_code": 1}


def test_a_reply_waiting_in_the_inbox_is_applied_before_an_escalation_round(
        fleet: InlineFleet, svc: DrillService) -> None:
    drill_id, codes = announced(svc)
    store(fleet, BOB, codes["bob"], "31")  # bob answered; no worker has applied it yet
    assert fire_drill_timer(svc, f"{drill_id}:0:1") == "escalated"
    chased = [s["operator"] for s in svc.store.sends(drill_id) if s["step"] == "escalation"]
    assert chased == ["alice"], f"escalated for {chased} though bob's reply had arrived"
    (told,) = [s for s in svc.store.sends(drill_id) if s["step"] == "escalation_recipients"]
    assert svc.store.field(drill_id, "p0:r1") == '["alice"]' and told["to"] == ["carol"]


# A reminder re-sends the operator's code: it must still confirm, whatever reply_code_ttl.

def test_a_reminder_keeps_its_code_valid(fleet: InlineFleet, svc: DrillService) -> None:
    drill_id, codes = announced(svc, phases=[{"name": "primary stopped", "deadline": "1s"}],
                                reply_code_ttl="1s")
    time.sleep(1.2)  # both codes expired before the first escalation round
    # Meanwhile bob's expired code went to another drill's operator (codes are reused).
    fleet.redis.hset(f"ntf:rc:{codes['bob']}", mapping={"drill": "dr-other", "operator": "x"})
    assert fire_drill_timer(svc, f"{drill_id}:0:1") == "escalated"  # "reminder 1, reply ..."
    bob_code = svc.store.field(drill_id, "p0|bob|code") or ""
    assert svc.store.field(drill_id, "p0|alice|code") == codes["alice"]  # the same, renewed
    assert bob_code not in ("", codes["bob"])  # a new one: his old one is someone else's
    store(fleet, ALICE, codes["alice"], "41")
    store(fleet, BOB, bob_code, "42")
    assert apply_due(svc) == {"confirmed": 2}


def test_the_report_places_replies_when_they_arrived_not_when_a_worker_applied_them(
        fleet: InlineFleet, svc: DrillService) -> None:
    drill_id, codes = announced(svc)
    store(fleet, ALICE, codes["alice"], "51")  # alice confirms during phase 0 ...
    store(fleet, BOB, "done", "52")  # ... bob answers without his code, also during phase 0
    time.sleep(0.2)
    svc.start_phase(drill_id)  # the lead moves on before a worker got to the replies
    assert apply_due(svc) == {"confirmed": 1, "no_code": 1}
    report = build_report(svc, drill_id)
    events = [(e["event"], e["phase"], e["operator"]) for e in report["timeline"]]
    confirmed = events.index(("confirmed", "primary stopped", "alice"))
    rejected = next(i for i, e in enumerate(events) if e[0] == "reply_rejected")
    started = events.index(("phase_started", "traffic switched", None))
    # Both replies came while phase 0 was live: the timeline shows them there, and bob's
    # rejected reply counts against phase 0, not the phase that started after it.
    assert confirmed < started and rejected < started, events
    assert events[rejected][1] == "primary stopped"
    assert [p["rejected_replies"] for p in report["phases"]] == [1, 0]


def test_a_reply_that_arrived_before_an_api_confirmation_is_the_confirmation(
        fleet: InlineFleet, svc: DrillService) -> None:
    drill_id, codes = announced(svc)
    received = time.time()
    store(fleet, ALICE, codes["alice"], "61")  # alice replied; no worker has applied it yet
    time.sleep(0.3)
    # Seeing no confirmation, she (or the lead for her) confirms by API as well, later.
    assert svc.confirm(drill_id, "alice", by="lead").first
    assert apply_due(svc) == {"confirmed": 1}
    # What she did first counts, as of when it arrived, whatever order workers got to it.
    confirmed_at = float(svc.store.field(drill_id, "p0|alice|confirmed_at") or 0)
    assert received <= confirmed_at < received + 0.2, f"{confirmed_at - received:.1f} s late"
    assert svc.store.field(drill_id, "p0|alice|confirmed_via") == "sms"


def test_a_reply_another_worker_claimed_but_has_not_applied_is_waited_for_by_the_round(
        fleet: InlineFleet, svc: DrillService) -> None:
    drill_id, codes = announced(svc)
    store(fleet, BOB, codes["bob"], "71")  # bob answered in time...
    # ...and a worker applying replies claimed his, then was killed (or is still busy); its
    # lease (a minute; here a second) runs out later.
    assert len(Inbox(fleet.redis, INBOX, 3600, lease=1.0).claim()) == 1
    fire_drill_timer(svc, f"{drill_id}:0:1")
    chased = [s["operator"] for s in svc.store.sends(drill_id) if s["step"] == "escalation"]
    assert "bob" not in chased, "bob's reply had arrived: he is reminded, and carol told"
    assert svc.store.field(drill_id, "p0:r1") is None  # the round waits, for one lease at most
    # Once the dead worker's lease runs out, the round applies bob's reply and chases alice only.
    time.sleep(1.1)
    assert fire_drill_timer(svc, f"{drill_id}:0:1") == "escalated"
    chased = [s["operator"] for s in svc.store.sends(drill_id) if s["step"] == "escalation"]
    assert chased == ["alice"] and svc.store.field(drill_id, "p0:r1") == '["alice"]'
