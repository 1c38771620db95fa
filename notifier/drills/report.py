"""The drill report: per phase and operator, how long notification, delivery and confirmation
took against the targets, the escalations, the misses, and the whole timeline.

Targets (settings.drills): provider acceptance of the phase SMS ≤ target_notify (30 s),
delivery receipt ≤ target_switch (60 s), operator confirmation ≤ target_reply (5 min), each
measured from the phase start. A measure that is over its target, or missing once its target
has passed or its phase has ended, is flagged. Acceptance and receipt are read from the ledger
(the first `sent_at` / `delivered_at` of the operator's announcement transaction, whichever
channel carried it).
"""

from __future__ import annotations

import json
import time
from typing import Any

from notifier.drills.model import Drill
from notifier.drills.service import DrillService
from notifier.drills.store import op_field, step_field
from notifier.ledger import Ledger

MEASURES = ("accepted", "delivered", "confirmed")
LABELS = {"accepted": "provider accepted", "delivered": "delivery receipt",
          "confirmed": "confirmed"}


def _measure(at: float | None, started: float | None, target: float, until: float,
             closed: bool) -> dict[str, Any]:
    """`until`: when the phase ended (or now); a closed phase can no longer catch up."""
    if started is None:
        return {"seconds": None, "target": target, "status": "not_started", "flagged": False}
    if at is not None:
        seconds = round(max(at - started, 0.0), 3)
        status = "ok" if seconds <= target else "exceeded"
    else:
        seconds = None
        status = "missing" if closed or until - started > target else "pending"
    return {"seconds": seconds, "target": target, "status": status,
            "flagged": status in ("exceeded", "missing")}


def _first(values: list[float | None]) -> float | None:
    found = [v for v in values if v is not None]
    return min(found) if found else None


def _times(ledger: Ledger, txid: str | None) -> tuple[float | None, float | None]:
    """(first provider acceptance, first delivery receipt) over a transaction's deliveries."""
    if not txid:
        return None, None
    deliveries = ledger.deliveries(txid)
    return _first([d.sent_at for d in deliveries]), _first([d.delivered_at for d in deliveries])


def build_report(svc: DrillService, drill_id: str, now: float | None = None) -> dict[str, Any]:
    drill = svc.get(drill_id)
    state = svc.store.state(drill.id)
    sends = svc.store.sends(drill.id)
    timeline = svc.store.timeline(drill.id)
    at_now = time.time() if now is None else now
    t = svc.settings.drills
    targets = {"accepted": t.target_notify, "delivered": t.target_switch,
               "confirmed": t.target_reply}

    def when(name: str) -> float | None:
        return float(state[name]) if name in state else None

    finished = when("finished_at")
    phases = []
    for i, phase in enumerate(drill.phases):
        started, ended = when(f"p{i}:started_at"), when(f"p{i}:ended_at")
        closed = ended is not None or finished is not None
        until = ended or finished or at_now
        operators = []
        for op in drill.operators:
            mine = [s for s in sends if s["phase"] == i and s["operator"] == op]
            announce = next((s["transaction_id"] for s in mine if s["step"] == "announce"), None)
            accepted_at, delivered_at = _times(svc.ledger, announce)
            confirmed_at = when(op_field(i, op, "confirmed_at"))
            times = {"accepted": accepted_at, "delivered": delivered_at,
                     "confirmed": confirmed_at}
            measures = {m: _measure(times[m], started, targets[m], until, closed)
                        for m in MEASURES}
            operators.append({
                "operator": op, "announce_transaction": announce,
                **measures,
                "confirmed_via": state.get(op_field(i, op, "confirmed_via")),
                "escalations": [{"round": s["round"], "at": s["at"], "channels": s["channels"],
                                 "transaction_id": s["transaction_id"]}
                                for s in mine if s["step"] == "escalation"],
                "result": _result(confirmed_at, started, phase.deadline,
                                  op_field(i, op, "missed") in state, ended or finished),
            })
        phases.append({
            "index": i, "name": phase.name, "deadline": phase.deadline, "started_at": started,
            "ended_at": ended, "operators": operators,
            "escalation_recipients": [
                {"round": s["round"], "at": s["at"], "to": s["to"],
                 "transaction_id": s["transaction_id"]}
                for s in sends if s["phase"] == i and s["step"] == "escalation_recipients"],
            "rejected_replies": sum(1 for e in timeline
                                    if e["event"] == "reply_rejected" and e.get("phase") == i),
            "failed_steps": _failed_steps(drill, i, state),
        })
    return {
        "drill": drill.to_json(), "generated_at": at_now, "finished_at": finished,
        "targets": targets, "phases": phases, "summary": _summary(phases),
        "timeline": _timeline(drill, timeline, state),
    }


def _failed_steps(drill: Drill, phase: int, state: dict[str, str]) -> list[dict[str, Any]]:
    """The phase's timer steps that kept failing and were given up, or are failing now and
    being retried (drills.escalation): a live report must show a step that has not gone out."""
    out = []
    for round_ in range(drill.escalation_rounds + 2):
        step = {"round": round_, "step": drill.step_name(round_)}
        raw = state.get(step_field(phase, round_, "given_up"))
        failures = state.get(step_field(phase, round_, "failures"))
        if raw is not None:
            out.append({**step, **json.loads(raw), "retrying": False})
        elif failures is not None:
            out.append({**step, "failures": int(failures), "retrying": True,
                        "since": float(state[step_field(phase, round_, "first_failed_at")])})
    return out


def _result(confirmed_at: float | None, started: float | None, deadline: float, missed: bool,
            closed: float | None) -> str:
    if started is None:
        return "not_started"
    if confirmed_at is not None:
        return "confirmed" if confirmed_at - started <= deadline else "confirmed_late"
    return "missed" if missed or closed is not None else "pending"


def _summary(phases: list[dict[str, Any]]) -> dict[str, Any]:
    rows = [op for p in phases if p["started_at"] is not None for op in p["operators"]]
    flags = [f"{p['name']} / {op['operator']}: {LABELS[m]} {op[m]['status']}"
             for p in phases for op in p["operators"] for m in MEASURES if op[m]["flagged"]]
    flags += [f"{p['name']}: {f['step']} (round {f['round']}) " + (
        f"failing, retrying ({f['failures']} failed attempt(s) so far; see the timeline)"
        if f["retrying"] else f"given up after {f['failures']} failed attempt(s): {f['error']}")
        for p in phases for f in p["failed_steps"]]
    misses = [f"{p['name']} / {op['operator']}" for p in phases for op in p["operators"]
              if op["result"] == "missed"]
    open_ = any(op["result"] == "pending" for op in rows)
    return {
        "expected_confirmations": len(rows),
        "confirmations": sum(1 for op in rows if op["result"].startswith("confirmed")),
        "escalations": sum(len(op["escalations"]) for op in rows),
        "misses": misses, "flags": flags,
        "result": "in_progress" if open_ else ("pass" if not flags and not misses else "fail"),
    }


def _timeline(drill: Drill, entries: list[dict[str, Any]], state: dict[str, str]
              ) -> list[dict[str, Any]]:
    origin = float(state.get("p0:started_at", drill.created_at))
    out = []
    for e in sorted(entries, key=lambda x: float(x["at"])):
        phase = e.get("phase")
        skip = ("at", "event", "phase", "operator", "name")
        detail = ", ".join(f"{k}={_text(v)}" for k, v in e.items() if k not in skip and v != "")
        out.append({
            "at": e["at"], "t": round(float(e["at"]) - origin, 3), "event": e["event"],
            "phase": drill.phases[phase].name if isinstance(phase, int) else None,
            "operator": e.get("operator"), "detail": detail,
        })
    return out


def _text(value: Any) -> str:
    return "/".join(map(str, value)) if isinstance(value, list) else str(value)
