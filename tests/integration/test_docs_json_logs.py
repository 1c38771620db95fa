"""docs/operations.md: "Every process writes one JSON object per line", and its runbooks pipe
the units' journal into `jq`, which stops at the first line that is not JSON. So neither the
API (uvicorn's own warnings) nor the worker (Celery's start-up banner) may write plain text."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx

from tests.support.configs import sandbox_email_config
from tests.support.servers import clean_env, free_port, wait_until

REPO = Path(__file__).resolve().parents[2]


def _start(argv: list[str], config: Path, log: Path) -> subprocess.Popen[bytes]:
    env = clean_env(NOTIFIER_CONFIG=str(config), NOTIFIER_LOG_LEVEL="INFO", PYTHONPATH=str(REPO))
    env.pop("NOTIFIER_REDIS_URL", None)
    with log.open("ab") as out:  # stdout and stderr, as journald keeps both
        return subprocess.Popen([sys.executable, "-m", "notifier", *argv], env=env,
                                cwd=log.parent, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _not_json(log: Path) -> list[str]:
    bad = []
    for line in log.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            bad.append(line)
            continue
        if not isinstance(entry, dict):
            bad.append(line)
    return bad


def _stop(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_the_api_writes_uvicorns_warnings_as_json_lines(redis_url: str, tmp_path: Path) -> None:
    log = tmp_path / "api.log"
    port = free_port()
    api = _start(["api", "--port", str(port)], sandbox_email_config(tmp_path, redis_url), log)
    try:
        def healthy() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(healthy, timeout=30, interval=0.2)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"GARBAGE \x00\x01 HTTP/9\r\n\r\n")  # uvicorn warns: invalid request
            sock.recv(200)
        wait_until(lambda: "Invalid HTTP request" in log.read_text(errors="replace"), timeout=10)
        assert _not_json(log) == []
    finally:
        _stop(api)


def test_the_worker_writes_no_plain_text_banner(redis_url: str, tmp_path: Path) -> None:
    log = tmp_path / "worker.log"
    worker = _start(["worker", "--queues", "notifier.dispatch,notifier.email", "--concurrency", "1"],
                    sandbox_email_config(tmp_path, redis_url), log)
    try:
        wait_until(lambda: " ready." in log.read_text(errors="replace"), timeout=60, interval=0.2)
        assert _not_json(log) == []
    finally:
        _stop(worker)
