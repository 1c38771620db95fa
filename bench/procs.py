"""The processes of one bench run: redis-server, the provider fake, notifier's api / worker /
scheduler and the baselines, each in its own session (process group) so it can be paused
(SIGSTOP/SIGCONT, children included) and stopped as a whole. Everything binds 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import redis

from tests.support.servers import clean_env, free_port

REPO = Path(__file__).resolve().parents[1]


def wait_for(what: str, predicate: Callable[[], object], timeout: float,
              check: Callable[[], None] | None = None, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check is not None:
            check()
        if predicate():
            return
        time.sleep(interval)
    raise RuntimeError(f"bench: {what} not ready within {timeout:.0f}s")


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class Procs:
    def __init__(self, workdir: Path | None = None) -> None:
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="notifier-bench-"))
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        # INFO, as deploy/systemd runs notifier: its log line per event and per delivery step
        # is part of what each costs.
        self.env = clean_env(PYTHONPATH=str(REPO), NOTIFIER_LOG_LEVEL="INFO")
        self.env.pop("NOTIFIER_REDIS_URL", None)

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> int:
        log = (self.workdir / f"{name}.log").open("ab")
        proc = subprocess.Popen(argv, env={**self.env, **(env or {})}, cwd=self.workdir,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc.pid

    def python(self, name: str, *args: str, env: dict[str, str] | None = None) -> int:
        return self.spawn(name, [sys.executable, *args], env)

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def alive(self, *names: str) -> None:
        for name in names:
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"bench: {name} exited (rc {proc.returncode}):\n"
                                   f"{self.log(name)[-3000:]}")

    def pid(self, name: str) -> int:
        return self.procs[name].pid

    def descendants(self, name: str) -> list[int]:
        """Every live process below `name` (a supervised worker: its Celery main + pool)."""
        found, frontier = [], [self.pid(name)]
        while frontier:
            out = subprocess.run(["pgrep", "-P", str(frontier.pop())], capture_output=True,
                                 text=True, check=False).stdout
            kids = [int(p) for p in out.split()]
            found += kids
            frontier += kids
        return found

    def pause(self, *names: str) -> None:
        for name in names:
            os.killpg(self.pid(name), signal.SIGSTOP)

    def resume(self, *names: str) -> None:
        for name in names:
            os.killpg(self.pid(name), signal.SIGCONT)

    def stop(self, name: str, timeout: float = 15.0) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGCONT)  # a paused group cannot act on SIGTERM
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        # Celery's prefork children may outlive a killed parent: end the group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    def stop_all(self) -> None:
        for name in reversed(list(self.procs)):
            self.stop(name)

    # -- the parts -----------------------------------------------------------------------

    def start_redis(self, appendfsync: str) -> str:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install -y redis-server)")
        port = free_port()
        data = self.workdir / "redis"
        data.mkdir(exist_ok=True)
        # No automatic AOF rewrite: it forks Redis, and the child's CPU lands in whichever phase
        # happens to run (it did, in the saturation rounds); its cost depends on the dataset's
        # size, not on the events a phase measures.
        self.spawn("redis", [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir",
                             str(data), "--save", "", "--appendonly", "yes",
                             "--appendfsync", appendfsync, "--auto-aof-rewrite-percentage", "0",
                             "--protected-mode", "yes"])
        client = redis.Redis(port=port, socket_connect_timeout=0.2)

        def pings() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        wait_for("redis-server", pings, 10, lambda: self.alive("redis"))
        client.close()
        return f"redis://127.0.0.1:{port}/0"

    def start_fake_dysmsapi(self, key_id: str, secret: str) -> int:
        port = free_port()
        self.python("fake-dysmsapi", "-m", "tests.fakes.dysmsapi", "--port", str(port),
                    "--access-key-id", key_id, "--access-key-secret", secret)
        wait_for("fake Dysmsapi", lambda: port_open(port), 20, lambda: self.alive("fake-dysmsapi"))
        return port


_TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, user+system CPU seconds) of one process, from /proc."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rpartition(")")[2].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK


def cpu_seconds(root: int) -> float:
    """CPU seconds used so far by `root` and its live descendants."""
    table: dict[int, tuple[int, float]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            found = _stat(int(entry.name))
            if found is not None:
                table[int(entry.name)] = found
    wanted, total, frontier = {root}, 0.0, [root]
    while frontier:
        pid = frontier.pop()
        if pid in table:
            total += table[pid][1]
        for child, (parent, _) in table.items():
            if parent == pid and child not in wanted:
                wanted.add(child)
                frontier.append(child)
    return total
