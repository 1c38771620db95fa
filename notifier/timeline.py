"""A transaction's delivery timeline as text for people (`notifier status`)."""

from __future__ import annotations

import time
from typing import Any


def _clock(ts: float | None) -> str:
    if ts is None:
        return "-"
    return time.strftime("%H:%M:%S", time.localtime(ts)) + f".{int(ts * 1000) % 1000:03d}"


def render_timeline(view: dict[str, Any]) -> str:
    event = view["event"]
    lines = [
        f"transaction {view['transaction_id']}  status: {view['status']}  source: {view['source']}",
        f"  event: [{event['kind']}/{event['severity']}] {event['title']}" if event is not None
        else f"  event: {view['event_error']}",
        f"  accepted {_clock(view['created_at'])}  finished {_clock(view['finished_at'])}"
        + (f"  duplicates suppressed: {view['suppressed_duplicates']}"
           if view["suppressed_duplicates"] else ""),
    ]
    for d in view["deliveries"]:
        via = f" via {d['provider']}" if d["provider"] else ""
        lines.append(f"  - {d['delivery_id']}  {d['channel']}{via} -> {d['recipient']} "
                     f"<{d['address'] or 'no address'}>  {d['status'].upper()}")
        if d["fallback_of"]:
            lines.append(f"      fallback of {d['fallback_of']}")
        for a in d["attempts"]:
            detail = a.get("error_code") or a.get("provider_message_id") or a.get("message", "")
            took = f" {a['latency_ms']:.0f}ms" if "latency_ms" in a else ""
            retry = f" retry at {_clock(a['retry_at'])}" if "retry_at" in a else ""
            lines.append(f"      {_clock(a['at'])}  {a['outcome']:<20} {detail}{took}{retry}")
        if d["reason"]:
            lines.append(f"      reason: {d['reason']}")
    for h in view["history"]:
        extra = " ".join(f"{k}={v}" for k, v in h.items() if k not in ("at", "event"))
        lines.append(f"  {_clock(h['at'])}  {h['event']} {extra}".rstrip())
    return "\n".join(lines)
