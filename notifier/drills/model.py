"""What a drill is: operators, ordered phases with deadlines, who to escalate to, how often.

The definition is immutable once created; what happens during the drill (phase starts, sends,
confirmations, escalations) is state kept beside it (`drills.store`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from notifier.config import Duration, Settings
from notifier.errors import NotifierError
from notifier.ids import ulid
from notifier.pipeline.routing import expand_recipients, unknown_targets

MAX_DURATION = 30 * 86400.0  # longest phase deadline and reply code lifetime


class DrillError(NotifierError):
    """Base of drill errors; the API maps each subclass onto a status code."""


class DrillNotFound(DrillError):
    pass


class DrillConflict(DrillError):
    """The request does not fit the drill's state (phase already started, drill finished)."""


class DrillInvalid(DrillError):
    """The request names something that does not exist; the message names the field."""


class PhaseIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=60)
    deadline: Duration | None = None  # default: drills.default_deadline


class DrillSpec(BaseModel):
    """The body of POST /v1/drills (and what `notifier drill start` builds)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=80)
    operators: list[str] = Field(min_length=1, max_length=50)  # recipients or groups
    phases: list[PhaseIn | str] = Field(min_length=1, max_length=20)
    escalation: list[str] = Field(default_factory=list, max_length=50)
    escalation_rounds: int | None = Field(default=None, ge=0, le=10)
    reply_code_ttl: Duration | None = None  # default: drills.reply_code_ttl
    severity: str = Field(default="critical", pattern=r"^[A-Za-z0-9_-]{1,32}$")
    start: bool = False  # start the first phase right away

    @field_validator("phases")
    @classmethod
    def _unique(cls, value: list[PhaseIn | str]) -> list[PhaseIn | str]:
        names = [p if isinstance(p, str) else p.name for p in value]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"phase names must be unique (repeated: {', '.join(dupes)})")
        if any(not n.strip() for n in names):
            raise ValueError("a phase name cannot be blank")
        return value


@dataclass(frozen=True)
class Phase:
    name: str
    deadline: float  # seconds from the phase start to the first escalation


@dataclass(frozen=True)
class Drill:
    id: str
    name: str
    operators: tuple[str, ...]
    phases: tuple[Phase, ...]
    escalation: tuple[str, ...]
    escalation_rounds: int
    reply_code_ttl: float
    severity: str
    created_at: float

    def phase_index(self, name: str) -> int | None:
        return next((i for i, p in enumerate(self.phases) if p.name == name), None)

    def step_name(self, round_: int) -> str:
        """What a phase's timer of round `round_` does (drills.escalation)."""
        if round_ == 0:
            return "announce"
        return "escalation" if round_ <= self.escalation_rounds else "record misses"

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "name": self.name, "operators": list(self.operators),
            "phases": [{"name": p.name, "deadline": p.deadline} for p in self.phases],
            "escalation": list(self.escalation), "escalation_rounds": self.escalation_rounds,
            "reply_code_ttl": self.reply_code_ttl, "severity": self.severity,
            "created_at": self.created_at,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Drill:
        return cls(
            id=str(data["id"]), name=str(data["name"]),
            operators=tuple(data["operators"]),
            phases=tuple(Phase(str(p["name"]), float(p["deadline"])) for p in data["phases"]),
            escalation=tuple(data["escalation"]),
            escalation_rounds=int(data["escalation_rounds"]),
            reply_code_ttl=float(data["reply_code_ttl"]), severity=str(data["severity"]),
            created_at=float(data["created_at"]),
        )


def human_duration(seconds: float) -> str:
    """12.3 s, 5 min, 1 h 30 min: for messages and reports."""
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds % 1 else f"{seconds:.0f} s"
    if seconds < 3600:
        minutes, rest = divmod(round(seconds), 60)
        return f"{minutes} min {rest} s" if rest else f"{minutes} min"
    hours, rest = divmod(round(seconds) // 60, 60)
    return f"{hours} h {rest} min" if rest else f"{hours} h"


def new_drill_id() -> str:
    return f"dr-{ulid()}"


def _check_duration(field: str, seconds: float) -> None:
    """Refused before anything is stored: Redis cannot hold an expiry (or a timer) that big,
    and a drill step that waits longer than MAX_DURATION is a typo, not a drill."""
    if seconds <= 0:
        raise DrillInvalid(f"{field}: must be longer than 0 s")
    if seconds > MAX_DURATION:
        raise DrillInvalid(f"{field}: at most {MAX_DURATION / 86400:.0f} d "
                           f"({MAX_DURATION:.0f} s), got {seconds:.6g} s")


def build_drill(settings: Settings, spec: DrillSpec, now: float | None = None) -> Drill:
    """Check the spec against the config and fill in the defaults."""
    for key, names in (("operators", spec.operators), ("escalation", spec.escalation)):
        unknown = unknown_targets(settings, tuple(names))
        if unknown:
            raise DrillInvalid(f"{key}: unknown recipient or group "
                               f"{', '.join(map(repr, unknown))}")
    if "sms" not in settings.channels:
        raise DrillInvalid("channels: drills announce by SMS, but no sms channel is configured")
    operators = expand_recipients(settings, spec.operators)
    if not operators:  # empty groups: a drill nobody is told of would report a pass
        raise DrillInvalid(f"operators: no recipient in {', '.join(map(repr, spec.operators))} "
                           "(empty groups)")
    defaults = settings.drills
    phases = tuple(
        Phase(p, defaults.default_deadline) if isinstance(p, str)
        else Phase(p.name, p.deadline if p.deadline is not None else defaults.default_deadline)
        for p in spec.phases
    )
    for i, phase in enumerate(phases):
        _check_duration(f"phases[{i}].deadline", phase.deadline)
    ttl = spec.reply_code_ttl if spec.reply_code_ttl is not None else defaults.reply_code_ttl
    _check_duration("reply_code_ttl", ttl)
    return Drill(
        id=new_drill_id(), name=spec.name.strip(),
        operators=operators,
        phases=phases, escalation=expand_recipients(settings, spec.escalation),
        escalation_rounds=(spec.escalation_rounds if spec.escalation_rounds is not None
                           else defaults.escalation_rounds),
        reply_code_ttl=ttl, severity=spec.severity,
        created_at=time.time() if now is None else now,
    )
