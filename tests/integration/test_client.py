"""notify() against a real redis-server, some of whose answers are lost on the way back (a TCP
proxy): a retry after a lost answer pages once, and the errors say whether anything was accepted."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis
import yaml

from notifier import AcceptOutcomeUnknown, BrokerUnavailable, notify
from notifier.client import as_event, intake_for, submit_retrying
from notifier.config import settings_from_mapping
from notifier.ledger_scripts import ACCEPT
from notifier.tasks_spec import DISPATCH_QUEUE
from tests.integration.test_api import CONFIG
from tests.support.lossy_proxy import LosesScriptReplies
from tests.support.servers import RedisServer

EVENT = {"title": "DiskFull on db-1", "severity": "critical"}


@pytest.fixture
def redis_upstream(redis_url: str, redis_client: redis.Redis) -> tuple[str, int]:
    redis_client.script_load(ACCEPT)  # so that the proxied EVALSHA runs it at once
    parts = urlsplit(redis_url)
    return parts.hostname or "127.0.0.1", parts.port or 6379


def proxy(upstream: tuple[str, int], lose: int) -> Iterator[LosesScriptReplies]:
    lossy = LosesScriptReplies(upstream, lose)
    yield lossy
    lossy.close()


@pytest.fixture
def loses_one(redis_upstream: tuple[str, int]) -> Iterator[LosesScriptReplies]:
    yield from proxy(redis_upstream, lose=1)


@pytest.fixture
def loses_all(redis_upstream: tuple[str, int]) -> Iterator[LosesScriptReplies]:
    yield from proxy(redis_upstream, lose=1000)


def transactions(redis_client: redis.Redis) -> list[bytes]:
    return [k for k in redis_client.keys("ntf:tx:*") if k.count(b":") == 2]


def test_notify_retries_a_lost_answer_and_pages_once(
        loses_one: LosesScriptReplies, redis_client: redis.Redis, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFIER_REDIS_URL", raising=False)
    config = tmp_path / "notifier.yaml"
    config.write_text(yaml.safe_dump({**CONFIG, "redis_url": loses_one.url}), encoding="utf-8")
    txid = notify(EVENT, config=str(config))  # the first try's answer is lost (5 s timeout)
    assert loses_one.lose == 0  # it was
    assert transactions(redis_client) == [f"ntf:tx:{txid}".encode()]  # the first try's
    assert redis_client.llen(DISPATCH_QUEUE) == 1


def test_an_answer_lost_on_every_try_is_outcome_unknown_and_its_key_retries_safely(
        loses_all: LosesScriptReplies, redis_client: redis.Redis) -> None:
    intake = intake_for(settings_from_mapping({**CONFIG, "redis_url": loses_all.url}),
                        socket_timeout=0.5)
    with pytest.raises(AcceptOutcomeUnknown, match="may have been accepted") as lost:
        submit_retrying(intake, as_event(EVENT))
    assert isinstance(lost.value, BrokerUnavailable)  # what callers caught before
    assert lost.value.idempotency_key and lost.value.idempotency_key in str(lost.value)
    assert redis_client.llen(DISPATCH_QUEUE) == 1  # stored by the first try, not again
    loses_all.lose = 0
    again = submit_retrying(intake, as_event(EVENT), lost.value.idempotency_key)
    assert transactions(redis_client) == [f"ntf:tx:{again.transaction_id}".encode()]  # the first's
    assert redis_client.llen(DISPATCH_QUEUE) == 1


def test_redis_down_is_nothing_accepted_not_outcome_unknown() -> None:
    server = RedisServer()
    server.start()
    intake = intake_for(settings_from_mapping({**CONFIG, "redis_url": server.url}))
    server.close()
    with pytest.raises(BrokerUnavailable, match="redis unavailable") as down:
        submit_retrying(intake, as_event(EVENT))
    assert not isinstance(down.value, AcceptOutcomeUnknown)
