"""The accept path's group commit (notifier.api.script_batch): what arrives while a script call
is in flight goes out as one call once its reply is in, and nothing waiting is stranded when
that call fails. Against a real redis-server, behind a relay that answers late."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from notifier.api.script_batch import ScriptBatcher
from notifier.records import text
from tests.support.servers import RedisServer
from tests.support.tcp_relay import SlowReplies

ECHO = "return ARGV"  # a call's items, in order: each item's result is itself


def echo_batcher(port: int, **client_options: Any) -> ScriptBatcher[str, str]:
    return ScriptBatcher(redis.Redis(port=port, **client_options), ECHO,
                         combine=lambda items: ([], items),
                         split=lambda _items, reply: [text(r) for r in reply], max_items=32)


def script_calls(server: RedisServer) -> int:
    stats = redis.Redis(port=server.port).info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


@pytest.fixture
def late(redis_server: RedisServer) -> Iterator[SlowReplies]:
    redis.Redis(port=redis_server.port).script_load(ECHO)  # no NOSCRIPT round trip to count
    relay = SlowReplies(("127.0.0.1", redis_server.port), 0.3)
    yield relay
    relay.close()


def test_what_arrives_during_a_call_goes_out_together_after_its_reply(
        redis_server: RedisServer, late: SlowReplies) -> None:
    async def scenario() -> list[str]:
        batcher = echo_batcher(late.port)
        first = batcher.run("a")
        await asyncio.sleep(0.05)  # its call is written; its reply comes 0.3 s later
        later = []
        for name in "bcd":  # each in a loop iteration of its own
            later.append(batcher.run(name))
            await asyncio.sleep(0.02)
        try:
            return list(await asyncio.wait_for(asyncio.gather(first, *later), 5))
        finally:
            await batcher.aclose()

    before = script_calls(redis_server)
    assert asyncio.run(scenario()) == ["a", "b", "c", "d"]
    assert script_calls(redis_server) - before == 2  # "a", then "b", "c" and "d" in one call


def test_what_waited_for_a_failed_call_is_sent_and_answered_not_stranded(
        redis_server: RedisServer) -> None:
    relay = SlowReplies(("127.0.0.1", redis_server.port), 3.0)  # past the client's timeout

    async def scenario() -> list[BaseException | str]:
        batcher = echo_batcher(relay.port, socket_timeout=0.5)
        first = batcher.run("a")
        await asyncio.sleep(0.05)
        second = batcher.run("b")  # waits for the first call, which times out
        try:
            return list(await asyncio.wait_for(
                asyncio.gather(first, second, return_exceptions=True), 10))
        finally:
            await batcher.aclose()

    try:
        outcomes = asyncio.run(scenario())
    finally:
        relay.close()
    assert [type(o) for o in outcomes] == [redis.TimeoutError, redis.TimeoutError]


def test_a_call_that_cannot_be_packed_fails_alone_and_does_not_hold_up_the_next(
        redis_server: RedisServer) -> None:
    async def scenario() -> tuple[BaseException | str, str]:
        batcher: ScriptBatcher[Any, str] = ScriptBatcher(
            redis.Redis(port=redis_server.port), ECHO, combine=lambda items: ([], items),
            split=lambda _items, reply: [text(r) for r in reply], max_items=32)
        try:
            bad = batcher.run(None)  # not a value RESP can carry
            [outcome] = await asyncio.gather(bad, return_exceptions=True)
            good = await asyncio.wait_for(batcher.run("next"), 5)
            return outcome, good
        finally:
            await batcher.aclose()

    outcome, good = asyncio.run(scenario())
    assert isinstance(outcome, TypeError)
    assert good == "next"


def test_closing_fails_what_waits_instead_of_opening_a_new_connection(
        redis_server: RedisServer, late: SlowReplies) -> None:
    async def scenario() -> tuple[list[BaseException | str], int]:
        batcher = echo_batcher(late.port)
        first = batcher.run("a")
        await asyncio.sleep(0.05)  # in flight, its reply held
        second = batcher.run("b")  # waits for it
        await batcher.aclose()
        outcomes = list(await asyncio.wait_for(
            asyncio.gather(first, second, return_exceptions=True), 5))
        await asyncio.sleep(0.1)
        return outcomes, clients()

    def clients() -> int:
        return int(redis.Redis(port=redis_server.port).info("clients")["connected_clients"])

    before = clients()
    outcomes, after = asyncio.run(scenario())
    assert [type(o) for o in outcomes] == [redis.ConnectionError, redis.ConnectionError]
    assert after == before  # through the relay: nothing left connected once closed
