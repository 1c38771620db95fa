"""The reconciler's log lines carry the transaction they are about (review 3, finding 6)."""

from __future__ import annotations

import logging

import pytest

from notifier.reconciler import reconcile
from tests.fakes.dysmsapi import FakeDysmsapi
from tests.integration.conftest import MakeFleet
from tests.integration.test_receipts import CONFIG, send_sms


def test_a_failed_query_is_logged_with_its_transaction(
    sms_fake: FakeDysmsapi, make_fleet: MakeFleet, caplog: pytest.LogCaptureFixture
) -> None:
    sms = {"provider": "aliyun", "endpoint": sms_fake.endpoint, "protocol": "http",
           "sign_name": "运维告警", "templates": {"alert": "SMS_1"},
           "read_timeout": "2s", "connect_timeout": "1s", "recipient_limits": []}
    fleet = make_fleet({**CONFIG, "channels": {**CONFIG["channels"], "sms": sms},
                        "reconcile_after": 0})
    sent = send_sms(fleet)
    sms_fake.script({"kind": "business", "code": "isp.RAM_PERMISSION_DENY",
                     "action": "QuerySendDetails"})
    with caplog.at_level(logging.WARNING, logger="notifier"):
        assert reconcile(fleet.deps) == {"error": 1}
    (record,) = [r for r in caplog.records if "QuerySendDetails for" in r.getMessage()]
    assert getattr(record, "transaction_id", None) == sent.transaction_id
    assert getattr(record, "delivery_id", None) == sent.id
