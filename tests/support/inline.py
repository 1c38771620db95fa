"""The pipeline driven synchronously, without Celery: published tasks are run in order.

The broker is the only part replaced (by a list); the ledger, buckets, breakers, renderer and
providers are the real ones on a real redis-server.
"""

from __future__ import annotations

import base64
import json
import os
import time
import uuid
from typing import Any

import redis

from notifier.aio import ProcessLoop
from notifier.breaker import FleetBreaker
from notifier.channels.base import ChannelContext
from notifier.channels.registry import build_providers
from notifier.config import BreakerPolicy, Settings, settings_from_mapping
from notifier.intake import Accepted, Intake
from notifier.ledger import Ledger
from notifier.metrics import Metrics
from notifier.pipeline.deliver import deliver_batch
from notifier.pipeline.deps import PipelineDeps
from notifier.pipeline.digest import flush
from notifier.pipeline.dispatch import dispatch_all
from notifier.pipeline.pacing import Pacer
from notifier.ratelimit import TokenBuckets
from notifier.scheduler import Timers
from notifier.tasks_spec import DELIVER, DIGEST, DISPATCH, DISPATCH_QUEUE
from notifier.templates import Renderer


def decode_task(raw: bytes) -> tuple[str, list[str]]:
    """A Celery message as kombu's Redis transport stores it -> (task name, args)."""
    envelope = json.loads(raw)
    args, _kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
    return envelope["headers"]["task"], list(args)


class ListPublisher:
    def __init__(self) -> None:
        self.tasks: list[tuple[str, list[str], str]] = []

    def publish(self, task: str, args: list[str], queue: str) -> None:
        self.tasks.append((task, args, queue))


class InlineIntake(Intake):
    """The real intake; the dispatch task it queued on Redis is moved onto the fleet's list."""

    def __init__(self, fleet: InlineFleet, *args: Any) -> None:
        super().__init__(*args)
        self.fleet = fleet

    def submit(self, *args: Any, **kwargs: Any) -> Accepted:
        accepted = super().submit(*args, **kwargs)
        self.fleet.take_queued_dispatches()
        return accepted

    def replay(self, *args: Any, **kwargs: Any) -> Accepted | None:
        accepted = super().replay(*args, **kwargs)
        self.fleet.take_queued_dispatches()
        return accepted


class InlineFleet:
    def __init__(self, redis_url: str, config: dict[str, Any], env: dict[str, str] | None = None
                 ) -> None:
        self.settings: Settings = settings_from_mapping({**config, "redis_url": redis_url})
        self.redis = redis.Redis.from_url(redis_url)
        self.publisher = ListPublisher()
        breakers: dict[str, FleetBreaker] = {}

        def breaker_for(name: str, policy: BreakerPolicy) -> FleetBreaker:
            return breakers.setdefault(name, FleetBreaker(self.redis, name, policy))

        context = ChannelContext(redis=self.redis, env={**os.environ, **(env or {})})
        self.deps = PipelineDeps(
            settings=self.settings, ledger=Ledger(self.redis, self.settings.retention),
            timers=Timers(self.redis), publisher=self.publisher, metrics=Metrics(self.redis),
            buckets=TokenBuckets(self.redis), breaker_for=breaker_for, renderer=Renderer(),
            providers=build_providers(self.settings, context), runner=ProcessLoop(),
            pacer=Pacer(self.redis),
        )
        self.loop = self.deps.runner
        self.intake = InlineIntake(self, self.settings, self.deps.ledger)
        self.outcomes: list[tuple[str, str]] = []

    def drain(self, timers_until: float = 0.0) -> list[tuple[str, str]]:
        """Run queued tasks; fire timers due within `timers_until` seconds from now (waiting)."""
        deadline = time.time() + timers_until
        while True:
            while self.publisher.tasks:
                task, args, _ = self.publisher.tasks.pop(0)
                if task == DISPATCH:  # a message may name several transactions
                    self.outcomes += list(zip(args, dispatch_all(self.deps, args), strict=True))
                elif task == DELIVER:  # several ids: one event's recipients, one request
                    token = uuid.uuid4().hex
                    self.outcomes += list(zip(args, deliver_batch(self.deps, args, token), strict=True))
                elif task == DIGEST:
                    self.outcomes.append((args[0], flush(self.deps, args[0])))
            due = self.deps.timers.due(time.time())
            for timer in due:
                self.publisher.publish(timer.task, [timer.arg], timer.queue)
                self.deps.timers.done(timer)
            if due:
                continue
            if time.time() >= deadline or self.deps.timers.pending() == 0:
                return self.outcomes
            time.sleep(0.02)

    def take_queued_dispatches(self) -> None:
        """The accept script queues dispatch tasks on the real Celery list: move them here."""
        while (raw := self.redis.rpop(DISPATCH_QUEUE)) is not None:
            task, args = decode_task(raw)
            self.publisher.publish(task, args, DISPATCH_QUEUE)

    def close(self) -> None:
        loop = self.deps.runner
        if isinstance(loop, ProcessLoop):
            loop.close()
        self.redis.close()
