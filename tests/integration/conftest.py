"""Fixtures the pipeline-level integration modules share: the Dysmsapi fake and inline fleets."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from celery.exceptions import SoftTimeLimitExceeded

from tests.fakes.dysmsapi import FakeDysmsapi
from tests.support.inline import InlineFleet

AK_ID, AK_SECRET = "LTAI-integration", "integration-secret-value"
SMS_ENV = {"ALIBABA_CLOUD_ACCESS_KEY_ID": AK_ID, "ALIBABA_CLOUD_ACCESS_KEY_SECRET": AK_SECRET}
MakeFleet = Callable[..., InlineFleet]


@pytest.fixture(scope="module")
def sms_fake_server() -> Iterator[FakeDysmsapi]:
    fake = FakeDysmsapi(AK_ID, AK_SECRET).start()
    yield fake
    fake.stop()


@pytest.fixture
def sms_fake(sms_fake_server: FakeDysmsapi) -> FakeDysmsapi:
    """The module's fake, with no messages and no scripted behaviour left from other tests."""
    sms_fake_server.reset()
    return sms_fake_server


@pytest.fixture
def make_fleet(redis_url: str) -> Iterator[MakeFleet]:
    """InlineFleet(config, env=SMS_ENV) factory; every fleet made is closed afterwards."""
    fleets: list[InlineFleet] = []

    def make(cfg: dict[str, Any], env: dict[str, str] | None = None) -> InlineFleet:
        fleets.append(InlineFleet(redis_url, cfg, SMS_ENV if env is None else env))
        return fleets[-1]

    yield make
    for fleet in fleets:
        fleet.close()


@pytest.fixture
def soft_limit_in() -> Iterator[Callable[[float], Any]]:
    """soft_limit_in(seconds): SIGALRM then raises SoftTimeLimitExceeded from a signal handler,
    as billiard does for Celery's task_soft_time_limit (inside whatever call is running)."""

    def handler(signum: int, frame: Any) -> None:
        raise SoftTimeLimitExceeded()

    previous = signal.signal(signal.SIGALRM, handler)
    yield lambda seconds: signal.setitimer(signal.ITIMER_REAL, seconds)
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)
