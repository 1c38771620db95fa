"""Drills on a real redis-server, pipeline inline (no Celery): timers that fire twice send
once, phases only move forward, replies through the inbox, and the drill API's answers to bad
requests (4xx naming the problem, never a 500)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from notifier.api.app import create_app
from notifier.channels.sandbox import outbox_key
from notifier.config import settings_from_mapping
from notifier.drills.escalation import fire_drill_timer
from notifier.drills.model import DrillConflict, DrillSpec
from notifier.drills.replies import Reply, apply_due, reply_inbox, store_replies
from notifier.drills.report import build_report
from notifier.drills.service import DrillService
from notifier.ledger_keys import PREFIX
from notifier.models import Event, Source
from notifier.scheduler import TIMERS
from tests.integration.conftest import MakeFleet
from tests.support.inline import InlineFleet
from tests.support.interleave import interleaved
from tests.support.servers import wait_until

CONFIG: dict[str, Any] = {
    "channels": {"sms": {"provider": "sandbox"}, "email": {"provider": "sandbox"}},
    "recipients": {
        "alice": {"phone": "+8613800138000", "email": "alice@example.com"},
        "bob": {"phone": "+8613900139000"},
        "carol": {"email": "carol@example.com"},
    },
    "groups": {"ops": ["alice", "bob"]},
    "routes": [{"match": {}, "to": ["carol"], "channels": ["sms"], "fallback": ["email"]}],
}
SPEC = {"name": "DR", "operators": ["ops"], "phases": ["primary stopped", "traffic switched"],
        "escalation": ["carol"], "escalation_rounds": 1}


@pytest.fixture
def fleet(make_fleet: MakeFleet) -> InlineFleet:
    return make_fleet(CONFIG)


@pytest.fixture
def svc(fleet: InlineFleet) -> DrillService:
    return DrillService(fleet.settings, fleet.redis, fleet.intake, fleet.deps.ledger,
                        fleet.deps.timers)


def sent_to(fleet: InlineFleet, channel: str) -> list[str]:
    return [json.loads(m)["to"] for m in fleet.redis.lrange(outbox_key(channel), 0, -1)]


def test_every_timer_fired_twice_still_sends_once(fleet: InlineFleet, svc: DrillService) -> None:
    drill = svc.create(DrillSpec.model_validate({**SPEC, "start": True}))
    assert drill.operators == ("alice", "bob")  # the group, expanded
    assert fleet.redis.zcard(TIMERS) == 1  # the announcement, scheduled with the phase start
    for round_, expected in ((0, "announced"), (1, "escalated"), (2, "missed")):
        for _ in range(2):  # at-least-once: a re-fired timer, a redelivered task
            assert fire_drill_timer(svc, f"{drill.id}:0:{round_}") == expected
        fleet.drain()
    assert sorted(sent_to(fleet, "sms")) == ["+8613800138000"] * 2 + ["+8613900139000"] * 2
    assert sorted(sent_to(fleet, "email")) == ["alice@example.com", "carol@example.com"]
    timeline = [e["event"] for e in svc.store.timeline(drill.id)]
    assert timeline.count("announce") == 2 and timeline.count("escalation") == 2
    assert timeline.count("escalation_recipients") == 1 and timeline.count("missed") == 2
    codes = {op: svc.store.field(drill.id, f"p0|{op}|code") for op in drill.operators}
    assert len(set(codes.values())) == 2  # one code per operator, the same on every re-send
    view = svc.status(drill.id)  # what GET /v1/drills/{id} shows: no reply codes
    assert all(set(op) == {"operator", "confirmed_at", "confirmed_via"}
               for phase in view["phases"] for op in phase["operators"])


def test_confirmed_operator_is_not_chased_and_timers_of_past_phases_do_nothing(
        fleet: InlineFleet, svc: DrillService) -> None:
    drill = svc.create(DrillSpec.model_validate({**SPEC, "start": True}))
    fire_drill_timer(svc, f"{drill.id}:0:0")
    code = svc.store.field(drill.id, "p0|alice|code")
    assert code is not None
    inbox = reply_inbox(fleet.redis, 3600)
    reply = Reply(phone="+8613800138000", content=f"{code} 确认", sequence_id="7")
    assert store_replies(inbox, [reply, reply]) == (1, 1)  # a re-push is stored once
    assert apply_due(svc) == {"confirmed": 1}
    assert fire_drill_timer(svc, f"{drill.id}:0:1") == "escalated"
    (escalation,) = [s for s in svc.store.sends(drill.id) if s["step"] == "escalation"]
    assert escalation["operator"] == "bob"
    svc.start_phase(drill.id)
    assert fire_drill_timer(svc, f"{drill.id}:0:2") == "phase_over"
    # alice's phase-1 code no longer confirms: its phase is over.
    store_replies(inbox, [Reply(phone="+8613800138000", content=code, sequence_id="8")])
    assert apply_due(svc) == {"phase_not_live": 1}


def test_phases_only_move_forward(svc: DrillService) -> None:
    drill = svc.create(DrillSpec.model_validate(SPEC))
    assert svc.start_phase(drill.id) == 0
    with pytest.raises(DrillConflict, match="already been started"):
        svc.start_phase(drill.id, "primary stopped")
    assert svc.start_phase(drill.id, "traffic switched") == 1
    with pytest.raises(DrillConflict, match="every phase"):
        svc.start_phase(drill.id)
    svc.finish(drill.id)
    with pytest.raises(DrillConflict, match="finished"):
        svc.finish(drill.id)


@pytest.fixture
def api(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    monkeypatch.setenv("NOTIFIER_API_TOKEN", "api-token")
    app = create_app(settings_from_mapping({**CONFIG, "redis_url": redis_url}))
    with TestClient(app, headers={"Authorization": "Bearer api-token"}) as client:
        yield client


@pytest.mark.parametrize(("method", "path", "body", "status", "problem"), [
    ("post", "/v1/drills", {**SPEC, "operators": ["mallory"]}, 422, "unknown recipient"),
    ("post", "/v1/drills", {**SPEC, "phases": ["a", "a"]}, 422, "unique"),
    ("post", "/v1/drills", {**SPEC, "phases": [{"name": "a", "deadline": "soon"}]}, 422,
     "duration"),
    ("post", "/v1/drills", {**SPEC, "phases": []}, 422, "phases"),
    ("post", "/v1/drills", {"name": "x"}, 422, "operators"),
    ("get", "/v1/drills/dr-nope", None, 404, "no drill"),
    ("post", "/v1/drills/dr-nope/phases", None, 404, "no drill"),
    ("post", "/v1/drills/dr-nope/confirm", {"operator": "alice"}, 404, "no drill"),
    ("get", "/v1/drills/dr-nope/report", None, 404, "no drill"),
])
def test_drill_api_answers_bad_requests_with_4xx(api: TestClient, method: str, path: str,
                                                 body: Any, status: int, problem: str) -> None:
    response = api.request(method.upper(), path, json=body)
    assert response.status_code == status, response.text
    assert problem in response.text


@pytest.mark.parametrize(("field", "problem"), [
    ('"phases": [{"name": "a", "deadline": 1e400}]', "phases.0.PhaseIn.deadline"),  # inf
    ('"phases": ["a"], "reply_code_ttl": 1e400', "reply_code_ttl"),
    # Finite but past what Redis can expire: was a 503 after the drill had been written.
    ('"phases": ["a"], "reply_code_ttl": 1e300', "reply_code_ttl: a duration must be at most 3650d"),
    ('"phases": ["a"], "reply_code_ttl": "40d"', "reply_code_ttl: at most 30 d"),
    ('"phases": ["a"], "reply_code_ttl": 1' + "0" * 400, "reply_code_ttl: a duration must be at most"),
    ('"phases": [{"name": "a", "deadline": "31d"}, "b"]', "phases[0].deadline: at most 30 d"),
])
def test_drill_with_an_endless_duration_is_refused_and_nothing_is_written(
        api: TestClient, field: str, problem: str) -> None:
    body = f'{{"name": "DR", "operators": ["ops"], {field}, "start": true}}'
    response = api.post("/v1/drills", content=body,
                        headers={"Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    assert problem in response.text
    assert api.get("/v1/drills").json() == []


def test_drill_api_flow(api: TestClient) -> None:
    assert api.post("/v1/drills", json=SPEC, headers={"Authorization": "Bearer x"}
                    ).status_code == 401
    created = api.post("/v1/drills", json=SPEC)
    assert created.status_code == 201
    drill_id = created.json()["id"]
    assert created.json()["current_phase"] is None
    conflict = api.post(f"/v1/drills/{drill_id}/confirm", json={"operator": "alice"})
    assert conflict.status_code == 409 and "no phase" in conflict.text
    started = api.post(f"/v1/drills/{drill_id}/phases")
    assert started.status_code == 200 and started.json()["started_phase"] == 0
    again = api.post(f"/v1/drills/{drill_id}/phases", json={"phase": "primary stopped"})
    assert again.status_code == 409
    unknown = api.post(f"/v1/drills/{drill_id}/phases", json={"phase": "nope"})
    assert unknown.status_code == 422 and "no phase 'nope'" in unknown.text
    not_op = api.post(f"/v1/drills/{drill_id}/confirm", json={"operator": "carol"})
    assert not_op.status_code == 422
    first = api.post(f"/v1/drills/{drill_id}/confirm", json={"operator": "bob", "by": "ops-lead"})
    second = api.post(f"/v1/drills/{drill_id}/confirm", json={"operator": "bob"})
    assert first.json()["already_confirmed"] is False and second.json()["already_confirmed"]
    status = api.get(f"/v1/drills/{drill_id}").json()
    bob = status["phases"][0]["operators"][1]
    assert bob["operator"] == "bob" and bob["confirmed_via"] == "api"
    report = api.get(f"/v1/drills/{drill_id}/report", params={"format": "markdown"})
    assert report.status_code == 200 and "| bob |" in report.text
    assert api.get(f"/v1/drills/{drill_id}/report", params={"format": "pdf"}).status_code == 422
    assert [d["id"] for d in api.get("/v1/drills").json()] == [drill_id]


def test_a_drill_whose_operators_are_an_empty_group_is_refused(
        redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The night shift's group is emptied in the config (everyone moved to days).
    monkeypatch.delenv("NOTIFIER_API_TOKEN", raising=False)
    config = {**CONFIG, "groups": {**CONFIG["groups"], "night": []}, "redis_url": redis_url}
    with TestClient(create_app(settings_from_mapping(config))) as api:
        response = api.post("/v1/drills", json={**SPEC, "operators": ["night"], "start": True})
        # Was 201: a drill nobody was told of, which then reported PASS (0/0 confirmations).
        assert response.status_code == 422, response.text
        assert "operators" in response.text and "night" in response.text
        assert api.get("/v1/drills").json() == []


def test_an_api_confirmation_racing_the_finish_is_refused_not_counted(
        fleet: InlineFleet, svc: DrillService) -> None:
    drill = svc.create(DrillSpec.model_validate({**SPEC, "start": True}))

    def lead_finishes() -> str:
        svc.finish(drill.id)
        return "finished"

    # The lead finishes the drill right after the confirmation found its phase live.
    with interleaved(fleet.redis, lambda a: a[0] == "HMGET" and "finished_at" in a,
                     lead_finishes, after=True) as ran, pytest.raises(DrillConflict):
        svc.confirm(drill.id, "bob")
    assert ran == ["finished"]
    # Was counted: bob confirmed after the drill ended (the API said so too), the report
    # showing him confirmed in a phase that was over.
    assert svc.store.field(drill.id, "p0|bob|confirmed_at") is None
    (_, bob) = build_report(svc, drill.id)["phases"][0]["operators"]
    assert bob["result"] == "missed"


def test_a_drill_step_refired_after_the_idempotency_ttl_does_not_page_again(
        make_fleet: MakeFleet) -> None:
    fleet = make_fleet({**CONFIG, "idempotency_ttl": "1s"})
    svc = DrillService(fleet.settings, fleet.redis, fleet.intake, fleet.deps.ledger,
                       fleet.deps.timers)
    drill = svc.create(DrillSpec.model_validate({**SPEC, "start": True}))

    def connection_lost() -> str:
        raise redis.ConnectionError("failover")

    # alice's announcement is accepted, and the answer is lost before the drill recorded it
    # (bob's goes out and is recorded): the step is retried.
    def alices(args: list[str]) -> bool:
        return any('"kind":"drill"' in a and '"to":["alice"]' in a for a in args)

    with interleaved(fleet.redis, alices, connection_lost, after=True):
        assert fire_drill_timer(svc, f"{drill.id}:0:0") == "retry"
    fleet.drain()
    # The retry comes after the idempotency TTL (the scheduler or the workers were down that
    # long): an ordinary event's idempotency key of the same age has expired by then.
    fleet.intake.submit(Event(kind="alert", title="t", to=("carol",)), Source.API,
                        idempotency_key="control")
    wait_until(lambda: not fleet.redis.exists(
        f"{PREFIX}idem:{hashlib.sha256(b'control').hexdigest()}"), timeout=10)
    assert fire_drill_timer(svc, f"{drill.id}:0:0") == "announced"
    fleet.drain()
    assert sorted(sent_to(fleet, "sms")) == ["+8613800138000", "+8613900139000"], "paged twice"
    alice, bob = build_report(svc, drill.id)["phases"][0]["operators"]
    for op in (alice, bob):  # the report times the SMS that went out
        assert op["accepted"]["status"] == "ok", op


def test_a_step_rerun_after_a_config_change_keeps_the_reminders_it_sent(
        make_fleet: MakeFleet) -> None:
    fleet = make_fleet(CONFIG)
    svc = DrillService(fleet.settings, fleet.redis, fleet.intake, fleet.deps.ledger,
                       fleet.deps.timers)
    drill = svc.create(DrillSpec.model_validate({**SPEC, "start": True}))
    assert fire_drill_timer(svc, f"{drill.id}:0:0") == "announced"

    def connection_lost() -> str:
        raise redis.ConnectionError("failover")

    def to_carol(args: list[str]) -> bool:
        return any('"to":["carol"]' in a for a in args)

    # The reminders go out; telling carol fails: the round is to run again.
    with interleaved(fleet.redis, to_carol, connection_lost):
        assert fire_drill_timer(svc, f"{drill.id}:0:1") == "retry"
    # Meanwhile a deploy gives alice a push device: her reminder would now go out on push too.
    pushed = {**CONFIG, "channels": {**CONFIG["channels"], "push": {"provider": "sandbox"}},
              "recipients": {**CONFIG["recipients"],
                             "alice": {**CONFIG["recipients"]["alice"], "push_tokens": ["tok-a"]}}}
    deployed = make_fleet(pushed)
    svc = DrillService(deployed.settings, deployed.redis, deployed.intake,
                       deployed.deps.ledger, deployed.deps.timers)
    assert fire_drill_timer(svc, f"{drill.id}:0:1") == "escalated"
    (phase,) = build_report(svc, drill.id)["phases"][:1]
    assert phase["failed_steps"] == []
    assert [e["to"] for e in phase["escalation_recipients"]] == [["carol"]]
    reminders = {op["operator"]: op["escalations"] for op in phase["operators"]}
    assert [len(r) for r in reminders.values()] == [1, 1], reminders
    assert svc.store.field(drill.id, "p0|alice|tx:escalation:1") == \
        reminders["alice"][0]["transaction_id"]
