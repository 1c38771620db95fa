"""Turning what senders post into Events (and the dedup key of an Alertmanager group)."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping

import orjson

from notifier.ledger_accept import EVENT_FIELD, WEBHOOK_FIELD
from notifier.models import Alert, Event
from notifier.schemas import AlertmanagerWebhook, EventIn, WebhookFields

SEVERITY_ORDER = ("critical", "error", "warning", "info", "none")


def _severity(payload: AlertmanagerWebhook) -> str:
    if "severity" in payload.commonLabels:
        return payload.commonLabels["severity"]
    found = {a.labels.get("severity", "") for a in payload.alerts if a.status == payload.status}
    for level in SEVERITY_ORDER:
        if level in found:
            return level
    return next(iter(sorted(found - {""})), "warning")


def alertmanager_kind(payload: WebhookFields) -> str:
    return "alert" if payload.status == "firing" else "resolved"


_QUOTED = re.compile(r"\\(.)", re.DOTALL)


def alertmanager_receiver(payload: WebhookFields) -> str:
    """The receiver's name as configured in Alertmanager, which sends it regex-quoted (Go's
    regexp.QuoteMeta: `ops.pager` arrives as `ops\\.pager`); routes match on the name."""
    quoted = payload.receiver
    return _QUOTED.sub(r"\1", quoted) if "\\" in quoted else quoted


def from_alertmanager(payload: AlertmanagerWebhook) -> Event:
    alerts = tuple(
        Alert(status=a.status, labels=a.labels, annotations=a.annotations, starts_at=a.startsAt,
              ends_at=a.endsAt, generator_url=a.generatorURL, fingerprint=a.fingerprint)
        for a in payload.alerts
    )
    firing = sum(1 for a in alerts if a.status == "firing")
    shown = firing if payload.status == "firing" else len(alerts) - firing
    group = " ".join(payload.groupLabels.values()) or payload.commonLabels.get("alertname", "")
    first = payload.alerts[0].annotations
    body = (payload.commonAnnotations.get("summary") or first.get("summary")
            or first.get("description", ""))
    return Event(
        kind=alertmanager_kind(payload),
        title=f"[{payload.status.upper()}:{shown + payload.truncatedAlerts}] {group}".strip(),
        body=body,
        severity=_severity(payload),
        labels=dict(payload.commonLabels),
        annotations=dict(payload.commonAnnotations),
        alerts=alerts,
        truncated_alerts=payload.truncatedAlerts,
        external_url=payload.externalURL,
    )


def alertmanager_dedup_key(payload: WebhookFields) -> str:
    """Same group, same status, same alerts (fingerprint + startsAt + status) -> same key.

    Alertmanager re-sends an identical body on retry and at repeat_interval; a changed set of
    alerts gives a new key and so a new notification. startsAt tells an alert that fired again
    (after resolving, within the dedup window) from the firing it had before: same fingerprint,
    but a new firing, which must page although its last message said resolved.
    """
    alerts = sorted([f"{a.fingerprint or orjson.dumps(a.labels, option=orjson.OPT_SORT_KEYS).decode()}"
                     f":{a.startsAt}:{a.status}" for a in payload.alerts])
    material = orjson.dumps([payload.receiver, payload.groupKey, payload.status, alerts,
                             payload.truncatedAlerts])
    return hashlib.sha256(material).hexdigest()


def from_event_in(body: EventIn) -> Event:
    # A channel named twice would fan out a delivery per listing: the same message twice.
    return Event(kind=body.kind, title=body.title, body=body.body, severity=body.severity,
                 labels=body.labels, annotations=body.annotations, to=tuple(body.to),
                 channels=tuple(dict.fromkeys(body.channels)))


def stored_event(fields: Mapping[str, str]) -> Event:
    """The event of a stored transaction (notifier.ledger_accept.Stored says how it is kept)."""
    if WEBHOOK_FIELD in fields:  # validated when accepted: parsing it again cannot fail
        return from_alertmanager(AlertmanagerWebhook.model_validate_json(fields[WEBHOOK_FIELD]))
    return Event.from_json(json.loads(fields[EVENT_FIELD]))
