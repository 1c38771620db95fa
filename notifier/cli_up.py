"""`notifier up`: api + worker + scheduler (+ a private redis-server) as one process tree."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

import celeryconfig
from notifier.api.auth import API_TOKEN_ENV, check_tokens, token_from_env
from notifier.config import check_claim_lease, config_path, read_config_file, settings_from_mapping
from notifier.errors import ConfigError
from notifier.models import TxStatus
from notifier.redis_conn import redacted
from notifier.timeline import render_timeline

STATE_DIR = Path(".notifier")

SANDBOX_CONFIG: dict[str, Any] = {
    "locale": "en",
    "channels": {
        "sms": {"provider": "sandbox", "rate_limit": {"rate": 50, "per": "1s", "burst": 100},
                "recipient_limits": [{"rate": 5, "per": "1m", "burst": 5},
                                     {"rate": 50, "per": "1d", "burst": 50}]},
        "email": {"provider": "sandbox", "rate_limit": {"rate": 20, "per": "1s", "burst": 40}},
        "push": {"provider": "sandbox"},
    },
    "recipients": {
        "alice": {"phone": "+8613800138000", "email": "alice@example.com",
                  "push_tokens": ["demo-token-alice"]},
        "bob": {"phone": "+8613900139000", "email": "bob@example.com", "locale": "zh-CN"},
        "carol": {"email": "carol@example.com"},  # duty manager: drill escalations
    },
    "groups": {"oncall": ["alice", "bob"]},
    "routes": [
        {"match": {"severity": "critical"}, "to": ["oncall"], "channels": ["sms", "push"],
         "fallback": ["email"]},
        {"match": {}, "to": ["oncall"], "channels": ["email"]},
    ],
}

DEMO_ALERT: dict[str, Any] = {
    "receiver": "notifier", "status": "firing", "version": "4",
    "groupKey": '{}/{severity="critical"}:{alertname="DiskFull"}', "truncatedAlerts": 0,
    "groupLabels": {"alertname": "DiskFull"},
    "commonLabels": {"alertname": "DiskFull", "severity": "critical", "cluster": "hz"},
    "commonAnnotations": {}, "externalURL": "http://alertmanager.local:9093",
    "alerts": [{"status": "firing", "fingerprint": "demo0001",
                "labels": {"alertname": "DiskFull", "severity": "critical", "instance": "db-1"},
                "annotations": {"summary": "磁盘 /data 使用率 97% on db-1"},
                "startsAt": "2026-11-23T03:49:41.730555223Z", "endsAt": "0001-01-01T00:00:00Z",
                "generatorURL": "http://prometheus.local:9090/graph"}],
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _effective_config(args: argparse.Namespace) -> dict[str, Any]:
    path = config_path(args.config)
    if path.exists():
        data = read_config_file(path) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    elif args.sandbox:
        data = dict(SANDBOX_CONFIG)
    else:
        raise ConfigError(f"{path}: no config file (write one, or run `notifier up --sandbox`)")
    if args.sandbox:  # same routes and limits, but nothing leaves this machine
        data["channels"] = _sandboxed(data.get("channels") or {}, path)
    data["public_url"] = f"http://127.0.0.1:{args.port}"
    if args.sandbox and "sms" in data["channels"]:  # receipts come back, as from Aliyun
        data["channels"]["sms"]["report_url"] = f"{data['public_url']}/v1/callbacks/aliyun/sms-report"
    return data


def _sandboxed(channels: Any, path: Path) -> dict[str, Any]:
    """Each channel's policy (limits, retries, breaker) with the sandbox as its provider. The
    file is not validated yet (that comes with the effective config): its shape is checked here."""
    if not isinstance(channels, dict) or not all(isinstance(ch, dict) for ch in channels.values()):
        raise ConfigError(f"{path}: channels: expected a mapping of channel name to its settings")
    return {name: {**{k: v for k, v in ch.items()
                      if k in ("rate_limit", "recipient_limits", "retry", "breaker")},
                   "provider": "sandbox"}
            for name, ch in channels.items()}


class ProcessTree:
    def __init__(self) -> None:
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str], quiet: bool = False) -> None:
        out = (STATE_DIR / f"{name}.log").open("ab") if quiet else None
        # argv is our own interpreter and redis-server, never user input.
        self.children.append((name, subprocess.Popen(argv, env=env, stdout=out, stderr=out)))  # noqa: S603

    def dead(self) -> str | None:
        return next((name for name, p in self.children if p.poll() is not None), None)

    def stop(self) -> None:
        for _, proc in reversed(self.children):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _, proc in reversed(self.children):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _start_redis(tree: ProcessTree) -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        raise ConfigError("no redis_url configured and redis-server is not installed "
                          "(apt-get install -y redis-server, or set NOTIFIER_REDIS_URL)")
    port = _free_port()
    data_dir = (STATE_DIR / "redis").resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    tree.start("redis", [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir",
                         str(data_dir), "--appendonly", "yes", "--appendfsync", "always",
                         "--save", ""], dict(os.environ),
               quiet=True)
    return f"redis://127.0.0.1:{port}/0"


def _wait_ready(base: str, tree: ProcessTree, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if tree.dead():
            raise ConfigError(f"`{tree.dead()}` exited during start-up (see its output above)")
        try:
            if httpx.get(f"{base}/readyz", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise ConfigError(f"the API at {base} did not become ready within {timeout:.0f}s")


def _demo(base: str) -> bool:
    token = token_from_env(API_TOKEN_ENV)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = httpx.post(f"{base}/v1/alertmanager", json=DEMO_ALERT, headers=headers, timeout=10)
    response.raise_for_status()
    txid = response.json()["transaction_id"]
    print(f"\ndemo: posted an Alertmanager webhook -> transaction {txid}")
    view: dict[str, Any] = {}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        view = httpx.get(f"{base}/v1/transactions/{txid}", headers=headers, timeout=5).json()
        if TxStatus(view["status"]).terminal:
            break
        time.sleep(0.2)
    print(render_timeline(view) + "\n")
    # Another shell has no NOTIFIER_CONFIG: name the config this tree runs on.
    cli = f"notifier --config {STATE_DIR / 'notifier.yaml'}"
    print(f"see it again with: {cli} status {txid}  (or GET {base}/v1/transactions/{txid})")
    print(f"the sandbox outbox (what would have been sent): {cli} outbox -v\n")
    return view.get("status") == TxStatus.DELIVERED.value


def run_up(args: argparse.Namespace) -> int:
    check_tokens()  # before any child starts: the API would refuse to
    data = _effective_config(args)
    tree = ProcessTree()
    try:
        redis_url = os.environ.get("NOTIFIER_REDIS_URL") or data.get("redis_url")
        if not redis_url:
            redis_url = data["redis_url"] = _start_redis(tree)
        # The children read the URL from NOTIFIER_REDIS_URL (below): one that came from there
        # stays out of the file written next, as its password must (the environment only).
        # Fail before starting anything else.
        check_claim_lease(settings_from_mapping(data, "effective config"), celeryconfig.task_time_limit)
        STATE_DIR.mkdir(exist_ok=True)
        effective = STATE_DIR / "notifier.yaml"
        effective.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), "utf-8")
        env = {**os.environ, "NOTIFIER_CONFIG": str(effective.resolve()),
               "NOTIFIER_REDIS_URL": redis_url}
        os.environ.update({"NOTIFIER_CONFIG": env["NOTIFIER_CONFIG"], "NOTIFIER_REDIS_URL": redis_url})
        me = [sys.executable, "-m", "notifier"]
        tree.start("api", [*me, "api", "--port", str(args.port)], env)
        tree.start("worker", [*me, "worker", "--concurrency", str(args.concurrency)], env)
        tree.start("scheduler", [*me, "scheduler"], env)
        base = f"http://127.0.0.1:{args.port}"
        _wait_ready(base, tree)
        print(f"notifier is up: API {base} (OpenAPI {base}/docs), redis {redacted(redis_url)}, "
              f"config {effective}")
        ok = _demo(base) if args.demo else True
        if args.exit_after_demo:
            return 0 if ok else 1
        stopping = False

        def _stop(*_: object) -> None:
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        print("press Ctrl-C to stop")
        while not stopping and tree.dead() is None:
            time.sleep(0.5)
        return 0 if stopping else 1
    finally:
        tree.stop()
