"""Timers of subsystems other than delivery (drill deadlines, ...), by name prefix."""

from __future__ import annotations

from notifier.drills.escalation import fire_drill_timer
from notifier.drills.service import TIMER_PREFIX, DrillService
from notifier.pipeline.deps import PipelineDeps


def fire_timer(deps: PipelineDeps, timer: str) -> str:
    kind, _, arg = timer.partition(":")
    if kind == TIMER_PREFIX:
        return fire_drill_timer(DrillService.from_deps(deps), arg)
    return f"unknown timer kind {kind!r} ({arg})"
