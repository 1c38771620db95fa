"""The pipeline's dependencies, built once per worker process (after Celery forks)."""

from __future__ import annotations

import os

from celery import Celery

from notifier.aio import ProcessLoop
from notifier.breaker import FleetBreaker
from notifier.celery_app import CeleryPublisher
from notifier.channels.base import ChannelContext
from notifier.channels.registry import build_providers
from notifier.config import BreakerPolicy, Settings
from notifier.ledger import Ledger
from notifier.metrics import Metrics
from notifier.pipeline.deps import PipelineDeps
from notifier.pipeline.pacing import Pacer
from notifier.ratelimit import TokenBuckets
from notifier.redis_conn import connect
from notifier.scheduler import Timers
from notifier.templates import Renderer


def build_deps(settings: Settings, app: Celery) -> PipelineDeps:
    client = connect(settings.redis_url, settings.redis_sentinel_master, socket_connect_timeout=2,
                     socket_timeout=10, health_check_interval=30)
    breakers: dict[str, FleetBreaker] = {}

    def breaker_for(name: str, policy: BreakerPolicy) -> FleetBreaker:
        if name not in breakers:
            breakers[name] = FleetBreaker(client, name, policy)
        return breakers[name]

    return PipelineDeps(
        settings=settings,
        ledger=Ledger(client, settings.retention),
        timers=Timers(client),
        publisher=CeleryPublisher(app),
        metrics=Metrics(client),
        buckets=TokenBuckets(client),
        breaker_for=breaker_for,
        renderer=Renderer(),
        providers=build_providers(settings, ChannelContext(redis=client, env=dict(os.environ))),
        runner=ProcessLoop(),
        pacer=Pacer(client),
        claim_lease=settings.claim_lease,
    )


class Runtime:
    """Lazily built per process: nothing that holds a socket or a loop exists before the fork."""

    def __init__(self, settings: Settings, app: Celery) -> None:
        self.settings = settings
        self.app = app
        self._deps: PipelineDeps | None = None
        self._pid = 0

    def consumes(self, queue: str) -> bool:
        """Does this worker consume `queue` (`notifier worker --queues`)? Only then may its
        dispatch tasks send a delivery of that queue inline."""
        return queue in self.app.amqp.queues.consume_from

    def deps(self) -> PipelineDeps:
        if self._deps is None or self._pid != os.getpid():
            self._deps = build_deps(self.settings, self.app)
            self._pid = os.getpid()
        return self._deps
