"""Keep a worker consuming across Redis restarts.

Celery workers on Redis have repeatedly been seen to log "Connection to broker lost", reconnect,
and then never consume again (celery#9054, #10205, #10302; kombu#2007 fixed one cause, reports
continue). An alerting pipeline cannot wait for someone to notice, so:

* the watchdog, a thread in the worker, is armed whenever Redis was unreachable or restarted
  (its `run_id` changed); once Redis is back, if this worker's queues have a backlog and no task
  has been received for `stall_after` seconds, it ends the process with EXIT_WEDGED;
* `supervise()` runs the Celery worker as a child process and starts it again when it exits
  for any reason other than being asked to stop.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence

import redis

EXIT_WEDGED = 75
log = logging.getLogger(__name__)


class Watchdog:
    def __init__(self, client: redis.Redis, queues: Sequence[str], *, stall_after: float = 20.0,
                 interval: float = 2.0, on_wedged: Callable[[], None] | None = None) -> None:
        self.redis = client
        self.queues = list(queues)
        self.stall_after = stall_after
        self.interval = interval
        self.on_wedged = on_wedged or (lambda: os._exit(EXIT_WEDGED))
        self.last_received = time.monotonic()
        self.armed_since: float | None = None
        self.run_id: str | None = None

    def task_received(self, *_: object, **__: object) -> None:
        """Connected to Celery's `task_received` signal (sent in the consumer process)."""
        self.last_received = time.monotonic()
        if self.armed_since is not None and self.last_received > self.armed_since:
            self.armed_since = None  # consuming again after the outage

    def check(self) -> bool:
        """One look; returns True when the worker is wedged."""
        try:
            run_id = str(self.redis.info("server").get("run_id", ""))
            backlog = sum(int(self.redis.llen(q)) for q in self.queues)
        except redis.RedisError:
            self._arm()
            return False
        if self.run_id is not None and run_id != self.run_id:
            self._arm()
        self.run_id = run_id
        if self.armed_since is None or backlog == 0:
            return False
        idle = time.monotonic() - max(self.last_received, self.armed_since)
        return idle > self.stall_after

    def _arm(self) -> None:
        if self.armed_since is None:
            self.armed_since = time.monotonic()

    def run(self) -> None:
        while True:
            time.sleep(self.interval)
            if self.check():
                log.error("worker stopped consuming after a Redis outage (backlog waiting, no "
                          "task received for %.0fs); exiting to be restarted", self.stall_after)
                self.on_wedged()
                return

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, name="notifier-watchdog", daemon=True)
        thread.start()
        return thread


def supervise(argv: list[str], env: dict[str, str] | None = None, *, restart_delay: float = 1.0
              ) -> int:
    """Run `argv` (the real worker) until asked to stop; restart it whenever it dies."""
    stopping = False
    child: subprocess.Popen[bytes] | None = None

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = 0
    # Checked before each start: a stop that arrives while waiting to restart a dead worker
    # must not start another, which would never get the signal (systemd SIGKILLs it later).
    while not stopping:
        child = subprocess.Popen(argv, env=env)  # noqa: S603 - our own interpreter and args
        if stopping:  # asked to stop while it was starting: `forward` saw the old child
            child.terminate()
        code = child.wait()
        if stopping:
            return code
        log.warning("worker process exited with %s; starting it again", code)
        time.sleep(restart_delay)
    return code
