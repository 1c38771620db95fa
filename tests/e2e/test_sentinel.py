"""Redis behind Sentinel: the whole fleet finds the master through `sentinel://` and follows a
failover (the master SIGKILLed, its replica promoted)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.support.servers import RedisServer, free_port, wait_until
from tests.support.stack import Stack

CONFIG = {"channels": {"email": {"provider": "sandbox"}},
          "recipients": {"alice": {"email": "alice@example.com"}},
          "routes": [{"match": {}, "to": ["alice"], "channels": ["email"]}],
          "redis_sentinel_master": "notifier-main", "reaper_after": "3s", "claim_lease": "10s"}


@pytest.fixture
def sentinel_setup(tmp_path: Path) -> Iterator[tuple[RedisServer, RedisServer, int]]:
    master, replica = RedisServer(), RedisServer()
    master.start()
    replica.start()
    follower = redis.Redis(port=replica.port)
    follower.replicaof("127.0.0.1", master.port)
    # Redis delays a first diskless sync by 5 s: wait until the replica really follows.
    wait_until(lambda: follower.info("replication").get("master_link_status") == "up", timeout=30)
    follower.close()
    port = free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
                    f"sentinel monitor notifier-main 127.0.0.1 {master.port} 1\n"
                    "sentinel down-after-milliseconds notifier-main 1000\n"
                    "sentinel failover-timeout notifier-main 5000\n")
    binary = shutil.which("redis-server")
    assert binary
    sentinel = subprocess.Popen([binary, str(conf), "--sentinel"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    probe = redis.Redis(port=port)
    wait_until(lambda: _replicas_known(probe), timeout=20)
    yield master, replica, port
    probe.close()
    sentinel.terminate()
    sentinel.wait(timeout=10)
    master.close()
    replica.close()


def _replicas_known(probe: redis.Redis) -> bool:
    try:
        return bool(probe.execute_command("SENTINEL", "REPLICAS", "notifier-main"))
    except redis.RedisError:
        return False


def test_fleet_follows_a_sentinel_failover(tmp_path: Path,
                                           sentinel_setup: tuple[RedisServer, RedisServer, int]
                                           ) -> None:
    master, replica, sentinel_port = sentinel_setup
    stack = Stack(tmp_path / "stack", f"sentinel://127.0.0.1:{sentinel_port}/0", CONFIG)
    (tmp_path / "stack").mkdir()
    stack.start()
    try:
        before = stack.post("/v1/events", {"title": "before the failover"}).json()
        assert stack.wait_final(before["transaction_id"])["status"] == "delivered"
        assert redis.Redis(port=master.port).exists(f"ntf:tx:{before['transaction_id']}")

        master.kill()
        wait_until(lambda: redis.Redis(port=replica.port).info("replication")["role"] == "master",
                   timeout=30, interval=0.2)

        def accepted() -> str | None:
            response = stack.post("/v1/events", {"title": "after the failover"})
            return str(response.json()["transaction_id"]) if response.status_code == 202 else None

        wait_until(accepted, timeout=30, interval=0.5)  # 503 until the API reconnects
        after = stack.post("/v1/events", {"title": "after the failover, again"}).json()
        view = stack.wait_final(after["transaction_id"], timeout=60)
        assert view["status"] == "delivered"
        assert redis.Redis(port=replica.port).exists(f"ntf:tx:{after['transaction_id']}")
        assert stack.transaction(before["transaction_id"])["status"] == "delivered"  # replicated
    finally:
        stack.stop()
