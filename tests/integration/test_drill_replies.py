"""Operator replies (Aliyun SmsUp) on a real redis-server, through the callback and the reply
inbox, pipeline inline (no Celery): bare mainland numbers, batches with a bad record, and
replies judged at the instant they arrived rather than when a worker got to them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from notifier.api.app import create_app
from notifier.config import settings_from_mapping
from notifier.drills.escalation import fire_drill_timer
from notifier.drills.model import DrillSpec
from notifier.drills.replies import apply_due
from notifier.drills.service import DrillService
from tests.integration.conftest import MakeFleet
from tests.support.inline import InlineFleet

UP = "/v1/callbacks/aliyun/sms-up"
ALICE, BOB = "+8615012345678", "+8613900139000"  # alice: a 150 number, also valid as +1 501...
CONFIG: dict[str, Any] = {
    "channels": {"sms": {"provider": "sandbox"}, "email": {"provider": "sandbox"}},
    "recipients": {
        "alice": {"phone": ALICE, "email": "alice@example.com"},
        "bob": {"phone": BOB},
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
