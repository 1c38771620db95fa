"""The worker watchdog and supervisor: a worker that stops consuming after a Redis restart is
ended and started again (celery#9054-style wedges)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import redis

from notifier.worker.watchdog import Watchdog
from tests.support.servers import RedisServer, wait_until


def test_wedge_after_redis_restart_is_detected_and_consuming_clears_it() -> None:
    server = RedisServer()
    server.start()
    try:
        client = redis.Redis.from_url(server.url, socket_connect_timeout=0.5, socket_timeout=0.5)
        dog = Watchdog(client, ["notifier.email"], stall_after=0.3)
        client.rpush("notifier.email", "task")
        assert dog.check() is False  # a backlog alone is not a wedge: nothing happened to Redis
        time.sleep(0.4)
        assert dog.check() is False
        server.stop()
        assert dog.check() is False  # Redis away: armed, but nothing to judge yet
        server.start()
        client.rpush("notifier.email", "task")
        assert dog.check() is False  # back; give the consumer stall_after to resume
        time.sleep(0.4)
        assert dog.check() is True  # backlog waiting and nothing received: wedged
        dog.task_received()
        assert dog.check() is False and dog.armed_since is None
        client.close()
    finally:
        server.close()


def test_restart_without_a_failed_ping_is_noticed_by_run_id() -> None:
    server = RedisServer()
    server.start()
    try:
        client = redis.Redis.from_url(server.url)
        dog = Watchdog(client, ["notifier.sms"], stall_after=0.2)
        assert dog.check() is False
        server.stop()
        server.start()
        client.rpush("notifier.sms", "task")
        assert dog.check() is False and dog.armed_since is not None
        time.sleep(0.3)
        assert dog.check() is True
        client.close()
    finally:
        server.close()


def test_supervisor_restarts_a_dying_worker_until_told_to_stop(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    child = tmp_path / "child.py"
    child.write_text(textwrap.dedent(f"""
        import os, signal, sys, time
        with open({str(runs)!r}, "a") as f:
            f.write("run\\n")
        if open({str(runs)!r}).read().count("run") >= 3:
            os.kill(os.getppid(), signal.SIGTERM)  # the operator stops the supervisor
            time.sleep(5)
        sys.exit(75)
    """))
    supervisor = subprocess.Popen([sys.executable, "-c", (
        "import sys; from notifier.worker.watchdog import supervise; "
        f"sys.exit(supervise([sys.executable, {str(child)!r}], restart_delay=0.1))")])
    try:
        assert supervisor.wait(timeout=30) != 0  # the stopped child's status
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
    wait_until(lambda: runs.read_text().count("run") == 3, timeout=5)


def test_supervisor_stopped_while_waiting_to_restart_starts_no_new_worker(tmp_path: Path) -> None:
    """systemctl stop arriving after the worker died, during the restart delay: the supervisor
    must stop there. Starting a new worker anyway leaves one that never got the SIGTERM, so the
    stop hangs until systemd's SIGKILL kills it mid-send."""
    runs = tmp_path / "runs"
    child = tmp_path / "child.py"
    child.write_text(textwrap.dedent(f"""
        import sys, time
        with open({str(runs)!r}, "a") as f:
            f.write("run\\n")
        if open({str(runs)!r}).read().count("run") == 1:
            sys.exit(75)  # the first worker dies (e.g. the watchdog's EXIT_WEDGED)
        time.sleep(30)  # a restarted worker runs until it is told to stop
    """))
    supervisor = subprocess.Popen([sys.executable, "-c", (
        "import sys; from notifier.worker.watchdog import supervise; "
        f"sys.exit(supervise([sys.executable, {str(child)!r}], restart_delay=2.0))")])
    try:
        wait_until(lambda: runs.exists() and runs.read_text().count("run") == 1, timeout=10)
        time.sleep(0.5)  # the first worker has exited; the supervisor waits to restart it
        supervisor.terminate()
        assert supervisor.wait(timeout=10) == 75  # the last worker's status, promptly
        assert runs.read_text().count("run") == 1  # no worker started after the stop
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
