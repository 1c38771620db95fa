"""The worker logs at NOTIFIER_LOG_LEVEL, as the systemd unit runs it (no --loglevel)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.support.configs import sandbox_email_config
from tests.support.servers import clean_env, wait_until

REPO = Path(__file__).resolve().parents[2]


def test_a_worker_started_as_the_unit_does_logs_each_delivery_with_its_transaction(
        redis_url: str, tmp_path: Path) -> None:
    config = sandbox_email_config(tmp_path, redis_url)
    # deploy/systemd/notifier-worker@.service: NOTIFIER_LOG_LEVEL=INFO, and
    # `notifier worker --queues ... --concurrency ...` with no --loglevel
    env = clean_env(NOTIFIER_CONFIG=str(config), NOTIFIER_LOG_LEVEL="INFO", PYTHONPATH=str(REPO))
    env.pop("NOTIFIER_REDIS_URL", None)
    log = tmp_path / "worker.log"
    with log.open("ab") as out:
        worker = subprocess.Popen([sys.executable, "-m", "notifier", "worker", "--queues",
                                   "notifier.dispatch,notifier.control,notifier.email",
                                   "--concurrency", "1"], env=env, cwd=tmp_path, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        sent = subprocess.run([sys.executable, "-m", "notifier", "send", "--title", "DiskFull",
                               "--to", "alice"], env=env, capture_output=True, text=True,
                              timeout=60, check=True)
        txid = sent.stdout.strip()

        def lines() -> list[dict[str, object]]:
            found = []
            for line in log.read_text(errors="replace").splitlines():
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if isinstance(entry, dict) and entry.get("transaction_id") == txid:
                    found.append(entry)
            return found

        # operations.md: `jq 'select(.transaction_id == ...)'` over the units' journal finds
        # the worker's line for each delivery step
        wait_until(lambda: any(e.get("outcome") == "sent" for e in lines()), timeout=30,
                   interval=0.2)
        # ... and not Celery's two lines per task ("Task ... received", "... succeeded in"):
        # our own lines say what each task did, with the transaction
        per_task = [line for line in log.read_text(errors="replace").splitlines()
                    if "received" in line or "succeeded in" in line]
        assert per_task == [], per_task[:4]
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
