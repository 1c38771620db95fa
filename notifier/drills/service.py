"""Running a drill: create it, start phases, confirm operators, show its status.

Used by the API, the CLI and the worker alike. Starting a phase only records the start and
schedules its first timer (atomically); the worker announces the phase when that timer fires
(`drills.escalation`), so an announcement survives a crash of whoever started the phase.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import redis

import celeryconfig
from notifier.config import Settings
from notifier.drills.codes import ReplyCodes
from notifier.drills.model import (
    Drill,
    DrillConflict,
    DrillInvalid,
    DrillNotFound,
    DrillSpec,
    build_drill,
)
from notifier.drills.store import DrillStore, op_field
from notifier.intake import Intake
from notifier.ledger import Ledger
from notifier.pipeline.deps import PipelineDeps
from notifier.scheduler import Timer, Timers
from notifier.tasks_spec import CONTROL_QUEUE, TIMER

TIMER_PREFIX = "drill"
# How long after it started an attempt at a drill step has ended, one way or another: the
# worker's hard time limit (task_time_limit, NOTIFIER_TASK_TIME_LIMIT) kills a task that
# outlives it; 10 s more for the pool to notice and for the clocks of different hosts. An
# attempt older than this that never recorded its end died with its worker (drills.escalation).
ATTEMPT_LIMIT = celeryconfig.task_time_limit + 10.0


def timer_arg(drill_id: str, phase: int, round_: int) -> str:
    """Round 0 announces the phase; 1..N are escalation rounds; N+1 records the misses."""
    return f"{TIMER_PREFIX}:{drill_id}:{phase}:{round_}"


@dataclass(frozen=True)
class Confirmation:
    first: bool  # False: this operator had confirmed this phase already
    phase: int
    operator: str
    at: float


class DrillService:
    def __init__(self, settings: Settings, client: redis.Redis, intake: Intake, ledger: Ledger,
                 timers: Timers, *, attempt_limit: float = ATTEMPT_LIMIT) -> None:
        self.settings = settings
        self.redis = client
        self.intake = intake
        self.ledger = ledger
        self.timers = timers
        self.attempt_limit = attempt_limit
        self.store = DrillStore(client, settings.retention)
        self.codes = ReplyCodes(client)

    @classmethod
    def from_deps(cls, deps: PipelineDeps) -> DrillService:
        intake = Intake(deps.settings, deps.ledger)
        return cls(deps.settings, deps.ledger.redis, intake, deps.ledger, deps.timers)

    def schedule(self, drill: Drill, phase: int, round_: int, due: float) -> None:
        self.timers.schedule(TIMER, CONTROL_QUEUE, timer_arg(drill.id, phase, round_), due)

    def hasten(self, drill: Drill, phase: int, round_: int, due: float) -> None:
        """Fire the step's timer at `due` if it is set for later (and still set at all)."""
        self.timers.hasten(TIMER, CONTROL_QUEUE, timer_arg(drill.id, phase, round_), due)

    def timer_done(self, arg: str) -> None:
        """Remove a fired timer ('<drill id>:<phase>:<round>') once its step has completed."""
        self.timers.cancel(TIMER, CONTROL_QUEUE, f"{TIMER_PREFIX}:{arg}")

    # -- lifecycle ------------------------------------------------------------------------

    def create(self, spec: DrillSpec) -> Drill:
        drill = build_drill(self.settings, spec)
        self.store.create(drill)
        self.store.log(drill, "created", operators=list(drill.operators),
                       phases=[p.name for p in drill.phases])
        if spec.start:
            self.start_phase(drill.id)
        return drill

    def get(self, drill_id: str) -> Drill:
        drill = self.store.drill(drill_id)
        if drill is None:
            raise DrillNotFound(f"no drill {drill_id!r} (unknown, or older than retention)")
        return drill

    def current(self, drill_id: str) -> int:
        return int(self.store.field(drill_id, "current") or "-1")

    def start_phase(self, drill_id: str, name: str | None = None) -> int:
        """Start the named phase, or the next one; returns its index."""
        drill = self.get(drill_id)
        if name is None:
            index = self.current(drill_id) + 1
            if index >= len(drill.phases):
                raise DrillConflict("every phase has been started; finish the drill instead")
        else:
            found = drill.phase_index(name)
            if found is None:
                known = ", ".join(repr(p.name) for p in drill.phases)
                raise DrillInvalid(f"phase: no phase {name!r} in this drill (phases: {known})")
            index = found
        now = time.time()
        announce = Timer(TIMER, CONTROL_QUEUE, timer_arg(drill.id, index, 0), now)
        outcome = self.store.start_phase(drill.id, index, now, announce)
        if outcome == "missing":
            raise DrillNotFound(f"no drill {drill_id!r}")
        if outcome != "ok":
            why = {"finished": "the drill is finished",
                   "started": f"phase {drill.phases[index].name!r} has already been started",
                   "passed": "a later phase is already live (phases only move forward)"}
            raise DrillConflict(why.get(outcome, outcome))
        self.store.log(drill, "phase_started", phase=index, name=drill.phases[index].name,
                       deadline=drill.phases[index].deadline)
        return index

    def finish(self, drill_id: str) -> None:
        drill = self.get(drill_id)
        if self.store.finish(drill.id, time.time()) != "ok":
            raise DrillConflict("the drill is already finished")
        self.store.log(drill, "finished")

    # -- confirmation ---------------------------------------------------------------------

    def is_live(self, drill_id: str, phase: int) -> bool:
        return self.store.is_live(drill_id, phase)

    def was_live(self, drill_id: str, phase: int, at: float) -> bool:
        return self.store.was_live(drill_id, phase, at)

    def record_confirmation(self, drill: Drill, phase: int, operator: str, via: str,
                            by: str, *, at: float | None = None) -> Confirmation:
        """The earliest confirmation counts; later ones are recorded as repeats. `at`: when
        the operator confirmed (an SMS reply: when it arrived), now by default. DrillConflict
        if the phase had ended or the drill finished by then (decided in the same write)."""
        now = time.time() if at is None else at
        first = self.store.confirm(drill.id, phase, operator, at=now, via=via, by=by)
        if first is None:
            raise DrillConflict(f"phase {drill.phases[phase].name!r} is not live")
        if first:
            self.store.log(drill, "confirmed", at=now, phase=phase, operator=operator, via=via,
                           by=by)
        at = float(self.store.field(drill.id, op_field(phase, operator, "confirmed_at")) or now)
        return Confirmation(first, phase, operator, at)

    def confirm(self, drill_id: str, operator: str, phase_name: str | None = None,
                by: str = "api") -> Confirmation:
        """Confirmation by API/CLI, for operators who cannot reply by SMS."""
        drill = self.get(drill_id)
        if operator not in drill.operators:
            raise DrillInvalid(f"operator: {operator!r} is not an operator of this drill "
                               f"(operators: {', '.join(drill.operators)})")
        if phase_name is None:
            phase = self.current(drill.id)
            if phase < 0:
                raise DrillConflict("no phase has been started yet")
        else:
            found = drill.phase_index(phase_name)
            if found is None:
                raise DrillInvalid(f"phase: no phase {phase_name!r} in this drill")
            phase = found
        if not self.is_live(drill.id, phase):
            raise DrillConflict(f"phase {drill.phases[phase].name!r} is not live")
        return self.record_confirmation(drill, phase, operator, "api", by)

    # -- views ----------------------------------------------------------------------------

    def status(self, drill_id: str) -> dict[str, Any]:
        drill = self.get(drill_id)
        state = self.store.state(drill.id)
        current = int(state.get("current", "-1"))

        def when(name: str) -> float | None:
            return float(state[name]) if name in state else None

        phases = []
        for i, phase in enumerate(drill.phases):
            operators = []
            for op in drill.operators:
                operators.append({
                    "operator": op,
                    "confirmed_at": when(op_field(i, op, "confirmed_at")),
                    "confirmed_via": state.get(op_field(i, op, "confirmed_via")),
                })
            phases.append({
                "index": i, "name": phase.name, "deadline": phase.deadline,
                "started_at": when(f"p{i}:started_at"), "ended_at": when(f"p{i}:ended_at"),
                "live": i == current and "finished_at" not in state,
                "operators": operators,
            })
        return {**drill.to_json(), "current_phase": current if current >= 0 else None,
                "finished_at": when("finished_at"), "phases": phases}
