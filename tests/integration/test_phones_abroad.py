"""Operators and recipients abroad: Aliyun writes every number outside mainland China as country
code + number without '+' (notifier.channels.sms_aliyun.aliyun_phone), and its SmsUp and
SmsReport pushes name the number that way too. For these mobiles the same digits also read as a
mainland *landline*: the mobile abroad is what was texted, so its reply confirms and its receipt
applies."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from notifier.api.app import create_app
from notifier.channels.sms_aliyun import aliyun_phone
from notifier.config import settings_from_mapping
from notifier.drills.escalation import fire_drill_timer
from notifier.drills.model import DrillSpec
from notifier.drills.replies import apply_due
from notifier.drills.service import DrillService
from notifier.receipts import apply_due as apply_receipts
from tests.integration import test_receipts as receipts
from tests.integration.conftest import MakeFleet
from tests.integration.test_drill_flow import CONFIG as FLOW_CONFIG
from tests.integration.test_drill_flow import SPEC

NORWAY = "+4740612345"  # '4740612345' also reads as a landline in Inner Mongolia (0474)
RUSSIA = "+79123456789"  # '79123456789' also reads as a landline in Nanchang (0791)
CONFIG: dict[str, Any] = {**FLOW_CONFIG, "recipients": {
    **FLOW_CONFIG["recipients"], "alice": {"phone": NORWAY, "email": "alice@example.com"},
    "bob": {"phone": RUSSIA}}}


@pytest.fixture
def api(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    monkeypatch.setenv("NOTIFIER_CALLBACK_TOKEN", receipts.CALLBACK_TOKEN)
    with TestClient(create_app(settings_from_mapping({**CONFIG, "redis_url": redis_url}))) as c:
        yield c


def test_replies_of_operators_abroad_confirm(make_fleet: MakeFleet, api: TestClient) -> None:
    fleet = make_fleet(CONFIG)
    svc = DrillService(fleet.settings, fleet.redis, fleet.intake, fleet.deps.ledger,
                       fleet.deps.timers)
    drill = svc.create(DrillSpec.model_validate({**SPEC, "start": True}))
    assert fire_drill_timer(svc, f"{drill.id}:0:0") == "announced"
    pushes = [{"phone_number": aliyun_phone(phone), "sequence_id": f"seq-{op}",
               "content": f"ok {svc.store.field(drill.id, f'p0|{op}|code')}",
               "send_time": "2026-11-23 10:00:00", "dest_code": "1"}
              for op, phone in (("alice", NORWAY), ("bob", RUSSIA))]
    response = api.post("/v1/callbacks/aliyun/sms-up", params={"token": receipts.CALLBACK_TOKEN},
                        content=json.dumps(pushes))
    assert response.status_code == 200, response.text
    assert apply_due(svc) == {"confirmed": 2}


def test_a_receipt_for_an_sms_abroad_applies(make_fleet: MakeFleet, api: TestClient) -> None:
    fleet = make_fleet({**receipts.CONFIG,
                        "recipients": {"alice": {"phone": NORWAY, "email": "a@example.com"}}})
    sms = receipts.send_sms(fleet)
    response = receipts.post(api, [receipts.report(sms, phone_number=aliyun_phone(NORWAY))])
    assert response.status_code == 200, response.text
    assert apply_receipts(fleet.deps) == {"delivered": 1}
