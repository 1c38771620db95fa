"""The worker's ProcessLoop when Celery's soft time limit cuts a provider call short (review 3,
finding 2): the abandoned call must never resume during a later task and finish its send."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis
from celery.exceptions import SoftTimeLimitExceeded

import celeryconfig
from notifier.aio import ProcessLoop
from notifier.channels.base import ChannelContext
from notifier.channels.email_smtp import CLOSE_SECONDS, QUIT_SECONDS, SmtpEmail
from notifier.config import SmtpProvider
from notifier.models import Outgoing, Rendered
from tests.fakes.smtp import FakeSmtp
from tests.support.servers import free_port
from tests.support.tcp_relay import SlowReplies


def test_a_send_cut_short_by_the_soft_time_limit_does_not_go_out_later(
    soft_limit_in: Any,
) -> None:
    smtp = FakeSmtp()
    smtp.start()
    proxy = SlowReplies(("127.0.0.1", smtp.port), 0.6, first_only=True)  # a loaded server
    loop = ProcessLoop()
    try:
        channel = SmtpEmail(
            SmtpProvider(provider="smtp", host="127.0.0.1", port=proxy.port, tls="none",
                         sender="notifier@alerts.example.com", timeout=5),
            ChannelContext(redis=redis.Redis(port=free_port()), env={}))
        message = Outgoing(delivery_id="dlv-1", transaction_id="tx-1",
                           address="alice@example.com", kind="alert",
                           rendered=Rendered(subject="s", text="t"))
        loop.run(asyncio.sleep(0))  # the worker child's loop exists already
        soft_limit_in(0.3)
        with pytest.raises(SoftTimeLimitExceeded):
            loop.run(channel.send(message))  # deliver() records it maybe-sent, retries later
        loop.run(asyncio.sleep(1.5))  # the next task on this worker child
        assert smtp.messages == [], "the abandoned send completed during a later task"
        assert loop.run(asyncio.sleep(0, "still usable")) == "still usable"
    finally:
        loop.close()
        proxy.close()
        smtp.stop()


def test_a_call_that_ignores_cancellation_is_dropped_with_its_loop(soft_limit_in: Any) -> None:
    """Cancellation cannot be forced: a call that swallows it keeps running for the settle
    time (SETTLE_SECONDS), then its loop is dropped and no later task ever runs it again."""
    steps: list[int] = []

    async def stubborn() -> None:
        while True:
            try:
                await asyncio.sleep(0.05)
                steps.append(1)
            except asyncio.CancelledError:
                pass  # a buggy provider swallowing the cancel

    loop = ProcessLoop()
    try:
        soft_limit_in(0.1)
        with pytest.raises(SoftTimeLimitExceeded):
            loop.run(stubborn())
        taken = len(steps)
        loop.run(asyncio.sleep(0.3))  # the next task: on a fresh loop, without the call
        assert len(steps) == taken
    finally:
        loop.close()


@pytest.mark.parametrize("timeout", [10.0, 60.0])
def test_an_smtp_send_always_ends_before_the_soft_time_limit(timeout: float) -> None:
    """Reviewer's arithmetic at the default timeout 10: 4 x 10 + 10 (QUIT) + 1 = 51 s, past the
    50 s soft limit. The send's deadline is clamped and QUIT and close are short and fixed."""
    channel = SmtpEmail(
        SmtpProvider(provider="smtp", sender="notifier@alerts.example.com", timeout=timeout),
        ChannelContext(redis=redis.Redis(port=free_port()), env={}))
    worst = channel.send_budget + QUIT_SECONDS + CLOSE_SECONDS
    assert worst < celeryconfig.task_soft_time_limit
