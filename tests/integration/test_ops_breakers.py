"""Breakers as an operator sees them: /metrics (what the alerts read) and `notifier breakers`
(what the runbooks tell them to run) on a real Redis."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import redis
import yaml
from prometheus_client import generate_latest

from notifier.api.state import ApiState
from notifier.breaker import FleetBreaker
from notifier.config import BreakerPolicy, settings_from_mapping
from tests.support.servers import clean_env


def config(redis_url: str, sms_provider: str) -> dict[str, Any]:
    return {
        "redis_url": redis_url,
        "channels": {"sms": {"provider": "sandbox", "name": sms_provider},
                     "email": {"provider": "sandbox"}},
        "recipients": {"alice": {"phone": "+8613800138000", "email": "alice@example.com"}},
        "routes": [{"match": {}, "to": ["alice"], "channels": ["sms"]}],
    }


def test_a_breaker_of_a_provider_no_longer_configured_does_not_alert_for_ever(
        redis_url: str, redis_client: redis.Redis, tmp_path: Path) -> None:
    # During an outage the operator forced the old SMS account's breaker open, then replaced
    # that account in the config. The old breaker's state stays in Redis.
    FleetBreaker(redis_client, "sms:old-account", BreakerPolicy()).force_open("alice", "outage")
    path = tmp_path / "notifier.yaml"
    path.write_text(yaml.safe_dump(config(redis_url, "new-account")), encoding="utf-8")

    # The CLI the runbook names (NotifierCircuitBreakerForcedOpen: `notifier breakers reset
    # NAME`) cannot touch it: it is not a configured provider.
    reset = subprocess.run([sys.executable, "-m", "notifier", "--config", str(path), "breakers",
                            "reset", "sms:old-account"], capture_output=True, text=True,
                           timeout=60, env=clean_env(), check=False)
    assert reset.returncode == 2 and "no breaker 'sms:old-account'" in reset.stderr

    # So /metrics must not report it either: NotifierCircuitBreakerForcedOpen (and, for an
    # automatic open, NotifierCircuitBreakerOpen) would fire for a provider nothing sends to,
    # and nothing the runbook says would clear it.
    state = ApiState(settings_from_mapping(config(redis_url, "new-account")))
    text = generate_latest(state.registry).decode()
    assert 'breaker="sms:old-account"' not in text, text
    assert 'notifier_breaker_state{breaker="sms:new-account",state="closed"} 1.0' in text
    assert 'notifier_breaker_state{breaker="email:sandbox",state="closed"} 1.0' in text
