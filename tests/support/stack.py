"""The service as real processes: `notifier api`, `notifier worker`, `notifier scheduler`.

    stack = Stack(tmp_path, redis_url, config_dict, env={"NOTIFIER_API_TOKEN": "t",
                                                               "NOTIFIER_CALLBACK_TOKEN": "c"})
    stack.start()             # waits for /readyz
    txid = stack.post("/v1/alertmanager", payload).json()["transaction_id"]
    view = stack.wait_final(txid)
    stack.kill_worker_child() / stack.restart_worker() / stack.stop()
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from notifier.config import parse_duration
from tests.support.servers import clean_env, free_port, wait_until

TERMINAL = {"delivered", "partial", "failed", "suppressed"}
REPO = Path(__file__).resolve().parents[2]


def _time_limit_for(config: dict[str, Any]) -> dict[str, str]:
    """A short claim_lease (a test of a taken-over claim that should not wait 2 min) needs a
    task time limit no longer than it, or the worker refuses the config (check_claim_lease)."""
    lease = parse_duration(config.get("claim_lease", "120s"))
    return {"NOTIFIER_TASK_TIME_LIMIT": str(int(lease))} if lease < 60 else {}


class Stack:
    def __init__(self, workdir: Path, redis_url: str, config: dict[str, Any], *,
                 env: dict[str, str] | None = None, concurrency: int = 2,
                 scheduler: bool = True, api_workers: int = 1) -> None:
        self.workdir = workdir
        self.redis_url = redis_url
        self.config = {**config, "redis_url": redis_url}
        self.port = free_port()
        self.config.setdefault("public_url", f"http://127.0.0.1:{self.port}")
        self.concurrency = concurrency
        self.with_scheduler = scheduler
        self.api_workers = api_workers
        self.config_path = workdir / "notifier.yaml"
        self.env = clean_env(**{"NOTIFIER_CONFIG": str(self.config_path), "NOTIFIER_LOG_LEVEL": "WARNING",
                                "PYTHONPATH": str(REPO), **_time_limit_for(self.config), **(env or {})})
        self.env.pop("NOTIFIER_REDIS_URL", None)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.token = (env or {}).get("NOTIFIER_API_TOKEN")

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _spawn(self, name: str, *args: str) -> None:
        with (self.workdir / f"{name}.log").open("ab") as log:  # the child keeps its own fd
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "notifier", *args], env=self.env, cwd=self.workdir,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )

    def start(self) -> Stack:
        """Start everything and wait until ready; on failure stop what did start."""
        self.config_path.write_text(yaml.safe_dump(self.config, allow_unicode=True), "utf-8")
        try:
            self._spawn("api", "api", "--port", str(self.port), "--workers", str(self.api_workers))
            self.start_worker()
            if self.with_scheduler:
                self._spawn("scheduler", "scheduler")
            wait_until(self._ready, timeout=30)
        except BaseException:
            self.stop()
            raise
        return self

    def start_worker(self) -> None:
        self._spawn("worker", "worker", "--concurrency", str(self.concurrency), "--loglevel", "INFO")
        wait_until(lambda: "ready." in self.log("worker"), timeout=30)

    def _ready(self) -> bool:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited early:\n{self.log(name)[-3000:]}")
        try:
            return httpx.get(f"{self.base}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def post(self, path: str, payload: Any = None, **kwargs: Any) -> httpx.Response:
        headers = {**self.headers(), **kwargs.pop("headers", {})}
        return httpx.post(f"{self.base}{path}", json=payload, headers=headers, timeout=10, **kwargs)

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.get(f"{self.base}{path}", headers=self.headers(), timeout=10, **kwargs)

    def transaction(self, txid: str) -> dict[str, Any]:
        response = self.get(f"/v1/transactions/{txid}")
        response.raise_for_status()
        return dict(response.json())

    def wait_final(self, txid: str, timeout: float = 30.0) -> dict[str, Any]:
        view: dict[str, Any] = {}

        def final() -> bool:
            nonlocal view
            view = self.transaction(txid)
            return view["status"] in TERMINAL

        wait_until(final, timeout=timeout, interval=0.1)
        return view

    @staticmethod
    def _children(pid: int) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True,
                             check=False).stdout
        return [int(p) for p in out.split()]

    def celery_main(self) -> int:
        """`notifier worker` supervises the Celery worker's main process."""
        (pid,) = self._children(self.procs["worker"].pid)
        return pid

    def worker_children(self) -> list[int]:
        return self._children(self.celery_main())

    def kill_worker_child(self) -> int:
        pid = self.worker_children()[0]
        os.kill(pid, signal.SIGKILL)
        return pid

    def kill(self, name: str) -> None:
        """SIGKILL a whole process group (a worker's children included)."""
        proc = self.procs.pop(name)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def stop(self) -> None:
        stopping = list(self.procs.values())
        self.procs.clear()
        for proc in stopping:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in stopping:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
