"""A real Alertmanager 0.25 (Debian's prometheus-alertmanager) posting to `notifier api` with a
bearer token: alerts fire, then resolve, and both notifications arrive by email."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import yaml

from tests.fakes.smtp import FakeSmtp
from tests.support.servers import RedisServer, free_port, wait_until
from tests.support.stack import Stack

TOKEN = "am-bearer-token-5e6f"


@pytest.fixture
def alertmanager_binary() -> str:
    binary = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
    assert binary, "prometheus-alertmanager is not installed: run scripts/install.sh"
    return binary


@pytest.fixture
def service(tmp_path: Path) -> Iterator[tuple[Stack, FakeSmtp]]:
    server = RedisServer()
    server.start()
    smtp = FakeSmtp()
    smtp.start()
    config = {"channels": {"email": {"provider": "smtp", "host": "127.0.0.1", "port": smtp.port,
                                     "sender": "notifier@example.com"}},
              "recipients": {"alice": {"email": "alice@example.com"}},
              "routes": [{"match": {"receiver": "notifier"}, "to": ["alice"],
                          "channels": ["email"]}]}
    stack = Stack(tmp_path / "stack", server.url, config, env={"NOTIFIER_API_TOKEN": TOKEN,
                                                                  "NOTIFIER_CALLBACK_TOKEN": "cb-" + TOKEN})
    (tmp_path / "stack").mkdir()
    stack.start()
    yield stack, smtp
    stack.stop()
    smtp.stop()
    server.close()


def test_real_alertmanager_fires_and_resolves_through_notifier(
        tmp_path: Path, alertmanager_binary: str, service: tuple[Stack, FakeSmtp]) -> None:
    stack, smtp = service
    am_port = free_port()
    am_config = {
        "route": {"receiver": "notifier", "group_by": ["alertname"], "group_wait": "1s",
                  "group_interval": "2s", "repeat_interval": "1h"},
        "receivers": [{"name": "notifier", "webhook_configs": [{
            "url": f"{stack.base}/v1/alertmanager", "send_resolved": True,
            "http_config": {"authorization": {"type": "Bearer", "credentials": TOKEN}}}]}],
    }
    config_file = tmp_path / "alertmanager.yml"
    config_file.write_text(yaml.safe_dump(am_config))
    log = (tmp_path / "alertmanager.log").open("wb")
    am = subprocess.Popen([
        alertmanager_binary, f"--config.file={config_file}", f"--storage.path={tmp_path / 'am'}",
        f"--web.listen-address=127.0.0.1:{am_port}", "--cluster.listen-address=",
    ], stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{am_port}"
        wait_until(lambda: _ready(base), timeout=30)
        now = datetime.now(UTC)
        alert = {"labels": {"alertname": "DiskFull", "severity": "critical", "instance": "db-1"},
                 "annotations": {"summary": "磁盘 /data 使用率 97% <b>now</b>"},
                 "startsAt": now.isoformat(), "endsAt": (now + timedelta(hours=1)).isoformat()}
        assert httpx.post(f"{base}/api/v2/alerts", json=[alert], timeout=5).status_code == 200
        wait_until(lambda: len(smtp.messages) >= 1, timeout=30)
        firing = smtp.messages[0]
        assert "DiskFull" in str(firing["Subject"])
        assert "磁盘 /data 使用率 97%" in firing.get_body(("plain",)).get_content()

        alert["endsAt"] = datetime.now(UTC).isoformat()  # resolve it
        assert httpx.post(f"{base}/api/v2/alerts", json=[alert], timeout=5).status_code == 200
        wait_until(lambda: len(smtp.messages) >= 2, timeout=30)
        resolved = smtp.messages[1]
        assert resolved["X-Notifier-Transaction-Id"] != firing["X-Notifier-Transaction-Id"]
        txid = resolved["X-Notifier-Transaction-Id"]
        view = stack.transaction(txid)
        assert view["source"] == "alertmanager" and view["event"]["kind"] == "resolved"
        assert view["status"] == "delivered" and view["receiver"] == "notifier"
        time.sleep(3)  # a group_interval later: Alertmanager re-sends nothing new
        assert len(smtp.messages) == 2
    finally:
        am.terminate()
        am.wait(timeout=10)
        log.close()


def _ready(base: str) -> bool:
    try:
        return httpx.get(f"{base}/-/ready", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
