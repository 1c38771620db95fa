"""Timers of subsystems other than delivery (drill deadlines, ...), by name prefix."""

from __future__ import annotations

from notifier.pipeline.deps import PipelineDeps


def fire_timer(deps: PipelineDeps, timer: str) -> str:
    kind, _, arg = timer.partition(":")
    deps.ledger.redis.incr("ntf:timer-fired")
    return f"unknown timer kind {kind!r} ({arg})"
