"""The drill report (`drills.report.build_report`) as Markdown, for people and tickets."""

from __future__ import annotations

import time
from typing import Any

from notifier.drills.model import human_duration
from notifier.drills.report import LABELS, MEASURES

_RESULT = {"confirmed": "confirmed", "confirmed_late": "confirmed late ⚠",
           "missed": "**MISSED** ⚠", "pending": "pending", "not_started": "not started"}


def _clock(ts: float | None) -> str:
    if ts is None:
        return "—"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) + f".{int(ts * 1000) % 1000:03d}"


def _cell(measure: dict[str, Any]) -> str:
    status = measure["status"]
    if measure["seconds"] is not None:
        text = human_duration(measure["seconds"])
        return f"{text} ✓" if status == "ok" else f"**{text}** ⚠ over {human_duration(measure['target'])}"
    shown = {"missing": "**none** ⚠", "pending": "pending", "not_started": "—"}
    return shown.get(str(status), str(status))


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(report: dict[str, Any]) -> str:
    drill, summary, targets = report["drill"], report["summary"], report["targets"]
    lines = [
        f"# Drill report: {_escape(drill['name'])}",
        "",
        f"- Drill `{drill['id']}`, created {_clock(drill['created_at'])}"
        + (f", finished {_clock(report['finished_at'])}" if report["finished_at"] else ""),
        f"- Operators: {', '.join(drill['operators'])}; escalation: "
        f"{', '.join(drill['escalation']) or 'none'}, {drill['escalation_rounds']} round(s)",
        "- Targets from the phase start: "
        + ", ".join(f"{LABELS[m]} ≤ {human_duration(targets[m])}" for m in MEASURES),
        f"- Result: **{summary['result'].upper()}** — {summary['confirmations']}/"
        f"{summary['expected_confirmations']} confirmations, {summary['escalations']} "
        f"escalation(s), {len(summary['misses'])} miss(es), {len(summary['flags'])} flag(s)",
    ]
    for phase in report["phases"]:
        lines += ["", f"## Phase {phase['index'] + 1}: {_escape(phase['name'])}", ""]
        if phase["started_at"] is None:
            lines.append("Not started.")
            continue
        lines += [
            f"Started {_clock(phase['started_at'])}, deadline {human_duration(phase['deadline'])}"
            + (f", ended {_clock(phase['ended_at'])}" if phase["ended_at"] else "")
            + f"; {phase['rejected_replies']} rejected repl(ies).",
            "",
            "| operator | " + " | ".join(LABELS[m] for m in MEASURES)
            + " | escalations | result |",
            "|---|---|---|---|---|---|",
        ]
        for op in phase["operators"]:
            via = f" (via {op['confirmed_via']})" if op["confirmed_via"] else ""
            lines.append(
                f"| {op['operator']} | " + " | ".join(_cell(op[m]) for m in MEASURES)
                + f"{via} | {len(op['escalations'])} | {_RESULT.get(op['result'], op['result'])} |"
            )
        for esc in phase["escalation_recipients"]:
            lines.append(f"\nEscalation round {esc['round']} notified {', '.join(esc['to'])} at "
                         f"{_clock(esc['at'])} (transaction `{esc['transaction_id']}`).")
    if summary["misses"] or summary["flags"]:
        lines += ["", "## Misses and flags", ""]
        lines += [f"- missed: {m}" for m in summary["misses"]]
        lines += [f"- ⚠ {f}" for f in summary["flags"]]
    lines += ["", "## Timeline", "", "| time | +s | event | phase | operator | detail |",
              "|---|---|---|---|---|---|"]
    for e in report["timeline"]:
        offset = e["t"] if abs(e["t"]) >= 0.05 else 0.0  # no "-0.0"
        lines.append(f"| {_clock(e['at'])} | {offset:+.1f} | {e['event']} | "
                     f"{_escape(e['phase'] or '')} | {e['operator'] or ''} | "
                     f"{_escape(e['detail'])} |")
    return "\n".join(lines) + "\n"
