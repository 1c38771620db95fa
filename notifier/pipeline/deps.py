"""Everything the pipeline stages use, handed in (the Celery shell builds it once per process)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from notifier.aio import AsyncRunner
from notifier.breaker import FleetBreaker
from notifier.channels.base import Channel
from notifier.config import BreakerPolicy, Settings
from notifier.ledger import Ledger
from notifier.metrics import Metrics
from notifier.pipeline.pacing import Pacer
from notifier.ratelimit import TokenBuckets
from notifier.scheduler import Timers
from notifier.tasks_spec import Publisher
from notifier.templates import Renderer


@dataclass
class PipelineDeps:
    settings: Settings
    ledger: Ledger
    timers: Timers
    publisher: Publisher
    metrics: Metrics
    buckets: TokenBuckets
    breaker_for: Callable[[str, BreakerPolicy], FleetBreaker]
    renderer: Renderer
    providers: Mapping[str, Sequence[Channel]]  # channel -> providers, in fallback order
    runner: AsyncRunner
    pacer: Pacer
    # A claim older than this belongs to a worker that died mid-send.
    claim_lease: float = 120.0
