"""Redis at `maxmemory` with `noeviction` refuses writes (OOM) while reads still work; Redis
configured to evict drops keys silently. On a real redis-server of this module's own, which
the tests reconfigure (CONFIG SET maxmemory / maxmemory-policy)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from prometheus_client import generate_latest

from notifier.api import raw
from notifier.api.app import create_app
from notifier.api.state import ApiState
from notifier.config import settings_from_mapping
from notifier.redis_health import check_eviction_policy
from tests.support.servers import RedisServer

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
CONFIG: dict[str, Any] = {
    "channels": {"sms": {"provider": "sandbox"}, "email": {"provider": "sandbox"}},
    "recipients": {"alice": {"phone": "+8613800138000", "email": "alice@example.com"}},
    "routes": [{"match": {}, "to": ["alice"], "channels": ["email"]}],
}
REPORT = [{"phone_number": "13800138000", "send_time": "2024-01-01 00:00:00",
           "report_time": "2024-01-01 00:00:01", "success": True, "err_code": "DELIVERED",
           "err_msg": "用户接收成功", "sms_size": "1", "biz_id": "12345^0", "out_id": "tx-1.0"}]


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    """This module's own redis-server: its memory settings are changed by the tests."""
    srv = RedisServer(appendonly=False)
    srv.start()
    yield srv
    srv.close()


@pytest.fixture
def client(server: RedisServer) -> Iterator[redis.Redis]:
    if server.process is None:
        server.start()
    rc = redis.Redis.from_url(server.url)
    rc.config_set("maxmemory", "0")
    rc.config_set("maxmemory-policy", "noeviction")
    rc.flushall()
    yield rc
    rc.config_set("maxmemory", "0")
    rc.config_set("maxmemory-policy", "noeviction")
    rc.close()


def full(rc: redis.Redis) -> None:
    """Redis at its limit: every write that could grow memory is refused with OOM."""
    rc.config_set("maxmemory", "1")
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        rc.set("probe", "x")


def scrape(server: RedisServer) -> dict[str, float]:
    state = ApiState(settings_from_mapping({**CONFIG, "redis_url": server.url}))
    text = generate_latest(state.registry).decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


def test_a_redis_refusing_writes_answers_503s_and_shows_on_metrics(
        server: RedisServer, client: redis.Redis, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Reads still work at maxmemory, so notifier_redis_up stays 1 and NotifierRedisDown never
    fires, while every webhook is answered 503: the SRE must see why."""
    # Once per 10 s per process: a 503 of an earlier test in this process must not silence it.
    monkeypatch.setattr(raw, "_last_said", [-raw.UNAVAILABLE_LOG_EVERY])
    app = create_app(settings_from_mapping({**CONFIG, "redis_url": server.url}))
    with caplog.at_level(logging.WARNING), TestClient(app, raise_server_exceptions=False) as http:
        assert http.post("/v1/events", json={"title": "before", "body": "b"}).status_code == 202
        assert scrape(server)["notifier_redis_writable"] == 1.0
        full(client)
        webhook = json.loads((FIXTURES / "alertmanager-firing.json").read_text())
        for path, body in [("/v1/events", {"title": "during", "body": "b"}),
                           ("/v1/alertmanager", webhook),
                           ("/v1/callbacks/aliyun/sms-report", REPORT)]:
            response = http.post(path, json=body)
            assert (response.status_code, response.headers.get("retry-after")) == (503, "1"), path
        # The API's log says why, once for the three 503s (not a line per request in a storm).
        said = [r.getMessage() for r in caplog.records if "answering 503" in r.getMessage()]
        assert len(said) == 1 and "OOM command not allowed" in said[0], said
        metrics = scrape(server)
        assert metrics["notifier_redis_up"] == 1.0  # reads work: not "down"
        assert metrics["notifier_redis_writable"] == 0.0
        assert metrics['notifier_redis_maxmemory_policy{policy="noeviction"}'] == 1.0
        client.config_set("maxmemory", "0")
        assert http.post("/v1/events", json={"title": "after", "body": "b"}).status_code == 202
        assert scrape(server)["notifier_redis_writable"] == 1.0


def test_an_evicting_policy_is_exported_and_warned_about_at_start(
        server: RedisServer, client: redis.Redis, caplog: pytest.LogCaptureFixture) -> None:
    client.config_set("maxmemory-policy", "allkeys-lru")
    assert scrape(server)['notifier_redis_maxmemory_policy{policy="allkeys-lru"}'] == 1.0
    app = create_app(settings_from_mapping({**CONFIG, "redis_url": server.url}))
    with caplog.at_level(logging.INFO), TestClient(app):
        pass
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "allkeys-lru" in r.getMessage()]
    assert warned and "noeviction" in warned[0].getMessage()


def test_noeviction_starts_quietly(server: RedisServer, client: redis.Redis,
                                   caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        assert check_eviction_policy(client) == "noeviction"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_the_policy_is_read_where_config_is_disabled_and_unknown_is_said_so(
        caplog: pytest.LogCaptureFixture) -> None:
    """Managed Redis often renames or disables CONFIG (and sometimes INFO): notifier reads the
    policy from INFO, and when neither answers it starts anyway, saying it could not check."""
    no_config = RedisServer(appendonly=False, extra_args=["--rename-command", "CONFIG", "",
                                                         "--maxmemory-policy", "volatile-lru"])
    no_config.start()
    try:
        with caplog.at_level(logging.INFO):
            assert check_eviction_policy(redis.Redis.from_url(no_config.url)) == "volatile-lru"
        assert any("volatile-lru" in r.getMessage() for r in caplog.records
                   if r.levelno == logging.WARNING)
    finally:
        no_config.close()
    caplog.clear()
    neither = RedisServer(appendonly=False, extra_args=["--rename-command", "CONFIG", "",
                                                       "--rename-command", "INFO", ""])
    neither.start()
    try:
        with caplog.at_level(logging.INFO):
            assert check_eviction_policy(redis.Redis.from_url(neither.url)) is None
        assert any("noeviction" in r.getMessage() and "could not" in r.getMessage()
                   for r in caplog.records)
        assert scrape(neither)["notifier_redis_up"] == 1.0  # and /metrics still works
    finally:
        neither.close()
