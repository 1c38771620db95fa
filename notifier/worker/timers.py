"""Timers of subsystems other than delivery (drill deadlines, ...), by name prefix."""

from __future__ import annotations

from notifier.drills.escalation import fire_drill_timer
from notifier.drills.service import TIMER_PREFIX, DrillService
from notifier.pipeline.deps import PipelineDeps
from notifier.tasks_spec import CONTROL_QUEUE, TIMER


def fire_timer(deps: PipelineDeps, timer: str) -> str:
    """The scheduler leases these timers instead of removing them: each subsystem removes its
    timer once its step completed (so a failed step is re-fired)."""
    kind, _, arg = timer.partition(":")
    if kind == TIMER_PREFIX:
        return fire_drill_timer(DrillService.from_deps(deps), arg)
    deps.timers.cancel(TIMER, CONTROL_QUEUE, timer)  # nobody will ever handle it: do not re-fire
    return f"unknown timer kind {kind!r} ({arg})"
