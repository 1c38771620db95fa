"""Shared fixtures: one real redis-server per test session; each test gets a flushed DB."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import pytest
import redis

from notifier.logs import JsonFormatter
from tests.support.servers import RedisServer

for _proxy in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
    os.environ.pop(_proxy, None)  # the Aliyun SDK honours proxies and ignores NO_PROXY


@pytest.fixture(autouse=True)
def _cli_logging_undone() -> Iterator[None]:
    """A test running the CLI's main() gets its process logging: a JSON handler on the stderr
    pytest captured for that test, and closes after it. Left on the root logger, the next
    line logged from a thread that outlives the test (the SMTP server's) fails to write."""
    root = logging.getLogger()
    before, level = set(root.handlers), root.level
    yield
    for handler in root.handlers[:]:
        if handler not in before and isinstance(handler.formatter, JsonFormatter):
            root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.close()


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A redis-server of the test's own, for tests that stop, crash or restart it (fsyncing
    every write, as a deployment that must keep every acknowledged alert through a crash does)."""
    server = RedisServer(appendfsync="always")
    server.start()
    yield server
    server.close()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    if redis_server.process is None:  # a previous test stopped it
        redis_server.start()
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    yield redis_server.url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()
