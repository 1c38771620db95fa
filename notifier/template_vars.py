"""What templates see: the context, the variables built from an event, and the text rules
(clipping, one-line SMS values, no control characters). Event text is data here, never source."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from notifier.models import Alert, Event

ELLIPSIS = "…"
CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_URL = re.compile(r"(?i)\b(?:https?://|www\.)\S+")
_TIMESTAMP = re.compile(r"(\d{4}-\d{2}-\d{2})[T ](\d{2}:\d{2}:\d{2})(?:\.\d+)?(Z|[+-]\d{2}:\d{2})?")
_SEVERITY_RANK = {"critical": 0, "page": 0, "error": 1, "high": 1, "warning": 2, "warn": 2}


@dataclass(frozen=True)
class TemplateContext:
    """Everything a message is rendered from."""

    event: Event
    transaction_id: str
    recipient: str  # recipient name
    locale: str  # "en" | "zh-CN"
    # Storm protection: the merged events. When given, the digest template is used whatever
    # `event.kind` says (the pipeline passes the first merged event as `event`).
    digest: tuple[Event, ...] = ()
    # SMS: the kind whose Aliyun TemplateCode carries this message, when it has none of its own
    # ("" = its own). Only the variables then tell it apart from that kind's messages.
    sms_template: str = ""

    @property
    def kind(self) -> str:
        return "digest" if self.digest else self.event.kind


def text_units(text: str) -> int:
    """Length as the SMS gateway counts it: a Chinese character is one; a character outside the
    BMP is two, because Java-based gateways see a UTF-16 surrogate pair."""
    return len(text) + sum(1 for ch in text if ord(ch) > 0xFFFF)


def clip(text: str, limit: int) -> str:
    """Cut `text` to at most `limit` units, ending in an ellipsis when cut. 0: no limit."""
    if limit <= 0 or text_units(text) <= limit:
        return text
    kept: list[str] = []
    used = 1  # the ellipsis
    for ch in text:
        used += 2 if ord(ch) > 0xFFFF else 1
        if used > limit:
            break
        kept.append(ch)
    return "".join(kept).rstrip() + ELLIPSIS


def one_line(text: str) -> str:
    """Subjects, titles, SMS: no controls; any whitespace run (newlines too) is one space, which
    also keeps a label value from smuggling a header line into an email subject."""
    return re.sub(r"\s+", " ", CONTROLS.sub("", text)).strip()


def multi_line(text: str) -> str:
    """Plain bodies: no controls, no trailing blanks, at most one empty line in a row."""
    text = CONTROLS.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def sms_value(text: str, limit: int) -> str:
    """One TemplateParam value. Aliyun rejects variables carrying links
    (isv.PARAM_NOT_SUPPORT_URL), and 【】 inside a value would pass for a forged signature."""
    text = _URL.sub("", one_line(text)).replace("【", "[").replace("】", "]")
    return clip(re.sub(r"\s+", " ", text).strip(), limit)


def timefmt(value: object, offset_hours: float = 0) -> str:
    """Filter: RFC 3339 (nanoseconds too) -> 'YYYY-MM-DD HH:MM:SS' at UTC+offset_hours.
    Alertmanager's zero time (a firing alert's endsAt) becomes ''; anything else that is not a
    time (free text, or shaped like one but impossible: month 13, offset +99:00, a year 9999
    that UTC+8 pushes past the calendar) is shown as given."""
    match = _TIMESTAMP.fullmatch(str(value).strip())
    if not match:
        return str(value)
    day, clock, zone = match.groups()
    if day.startswith("0001-"):
        return ""
    # The value is sender data: a filter that raised would fail the whole message for good
    # (a template error), and the alert with it.
    try:
        stamp = datetime.fromisoformat(f"{day}T{clock}{'+00:00' if zone in (None, 'Z') else zone}")
        return stamp.astimezone(timezone(timedelta(hours=offset_hours))).strftime("%Y-%m-%d %H:%M:%S")
    except (ValueError, OverflowError):
        return str(value)


def _web_url(url: str) -> str:
    """Only http(s) links reach a template: a `javascript:` generatorURL must never be an href."""
    return url if re.match(r"(?i)https?://[^\s\"'<>]+$", url) else ""


def _alert_view(alert: Alert) -> dict[str, Any]:
    notes = alert.annotations
    return {
        "status": alert.status or "firing",
        "name": alert.labels.get("alertname", ""),
        "labels": dict(sorted(alert.labels.items())),
        "annotations": dict(notes),
        "summary": notes.get("summary") or notes.get("description") or notes.get("message", ""),
        "description": notes.get("description", ""),
        "starts_at": alert.starts_at,
        "ends_at": "" if alert.ends_at.startswith("0001-") else alert.ends_at,
        "generator_url": _web_url(alert.generator_url),
        "runbook_url": _web_url(notes.get("runbook_url", "")),
        "fingerprint": alert.fingerprint,
    }


def _digest_view(events: tuple[Event, ...]) -> dict[str, Any]:
    groups: dict[str, int] = {}
    for event in events:
        groups[event.title] = groups.get(event.title, 0) + 1
    return {
        "digest": [
            {"title": e.title, "severity": e.severity, "kind": e.kind, "alerts": len(e.alerts)}
            for e in events
        ],
        "digest_count": len(events),
        # Most frequent first; sorted() is stable, so ties keep arrival order.
        "digest_groups": [
            {"title": t, "count": n} for t, n in sorted(groups.items(), key=lambda i: -i[1])
        ],
        "digest_severity": min(
            (e.severity for e in events), key=lambda s: _SEVERITY_RANK.get(s.lower(), 3)
        ),
    }


def template_vars(ctx: TemplateContext) -> dict[str, Any]:
    """The variables every template sees (documented in templates/README.md)."""
    event = ctx.event
    alerts = [_alert_view(a) for a in event.alerts]
    first_summary = next((a["summary"] for a in alerts if a["summary"]), "")
    notes = event.annotations
    summary = notes.get("summary") or first_summary or event.body or notes.get("description", "")
    data: dict[str, Any] = {
        "event": event,
        "kind": ctx.kind,
        "sms_template": ctx.sms_template or ctx.kind,
        "title": event.title,
        "body": event.body,
        "severity": event.severity or "info",
        "status": "resolved" if ctx.kind == "resolved" else "firing",
        "labels": dict(sorted(event.labels.items())),
        "annotations": dict(event.annotations),
        "extra": dict(event.extra),
        "alerts": alerts,
        "count": max(len(alerts) + event.truncated_alerts, 1),
        "truncated": event.truncated_alerts,
        "firing_count": sum(1 for a in alerts if a["status"] != "resolved"),
        "resolved_count": sum(1 for a in alerts if a["status"] == "resolved"),
        "summary": summary,
        "external_url": _web_url(event.external_url),
        "transaction_id": ctx.transaction_id,
        "recipient": ctx.recipient,
        "locale": ctx.locale,
        "drill_name": event.extra.get("drill_name") or event.title,
        "phase": event.extra.get("phase", ""),
        **_digest_view(ctx.digest or (event,)),
    }
    # Only when present, so that a drill template without a code fails loudly (StrictUndefined)
    # instead of sending an SMS nobody can confirm.
    if "reply_code" in event.extra:
        data["reply_code"] = event.extra["reply_code"]
    return data


def without_links(value: Any) -> Any:
    if isinstance(value, str):
        return _URL.sub("", value)
    if isinstance(value, dict):
        return {k: without_links(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_links(v) for v in value]
    return value


def event_strings(ctx: TemplateContext) -> list[str]:
    """Every value an event carries, longest first: redacted from error messages."""
    found: set[str] = set()
    for event in (ctx.event, *ctx.digest):
        found.update((event.title, event.body, *event.labels.values(), *event.extra.values()))
        found.update(event.annotations.values())
        for alert in event.alerts:
            found.update((*alert.labels.values(), *alert.annotations.values()))
    return sorted((s for s in found if len(s) >= 3), key=len, reverse=True)
