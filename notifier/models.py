"""Value types shared by every layer. No Redis, no Celery, no HTTP here."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Source(StrEnum):
    ALERTMANAGER = "alertmanager"
    API = "api"
    CLIENT = "client"
    DRILL = "drill"
    REPLAY = "replay"


class TxStatus(StrEnum):
    ACCEPTED = "accepted"
    DISPATCHING = "dispatching"
    DELIVERED = "delivered"
    PARTIAL = "partial"
    FAILED = "failed"
    SUPPRESSED = "suppressed"

    @property
    def terminal(self) -> bool:
        return self in _TX_TERMINAL

    @classmethod
    def of(cls, status: str) -> TxStatus | None:
        """The status a stored string names; None for one this version does not know (a
        damaged row, or a status a later version added)."""
        return cls(status) if status in cls.__members__.values() else None


_TX_TERMINAL = frozenset({TxStatus.DELIVERED, TxStatus.PARTIAL, TxStatus.FAILED, TxStatus.SUPPRESSED})


class DeliveryStatus(StrEnum):
    QUEUED = "queued"
    SENDING = "sending"
    SENT = "sent"  # the provider accepted it
    DELIVERED = "delivered"  # a receipt says it reached the device / mailbox
    RETRYING = "retrying"
    DEFERRED = "deferred"  # rate-limited, waiting for tokens
    FAILED = "failed"
    FALLEN_BACK = "fallen_back"  # failed here, carried on by another delivery
    SUPPRESSED = "suppressed"  # merged into a digest delivery

    @property
    def terminal(self) -> bool:
        return self in _DELIVERY_TERMINAL

    @property
    def succeeded(self) -> bool:
        return self in (DeliveryStatus.SENT, DeliveryStatus.DELIVERED)


_DELIVERY_TERMINAL = frozenset(
    {
        DeliveryStatus.SENT,
        DeliveryStatus.DELIVERED,
        DeliveryStatus.FAILED,
        DeliveryStatus.FALLEN_BACK,
        DeliveryStatus.SUPPRESSED,
    }
)


class ErrorClass(StrEnum):
    """How a failed send is handled; every protocol's table maps onto these."""

    TRANSIENT = "transient"  # retry with backoff
    MAYBE_SENT = "maybe_sent"  # timed out after the request left: look it up before resending
    PERMANENT = "permanent"  # this message can never go out this way: fall back
    ACCOUNT = "account"  # provider account/auth broken: fall back and trip the breaker
    RECIPIENT_BUDGET = "recipient_budget"  # this recipient is capped for hours: fall back now


@dataclass(frozen=True)
class Alert:
    """One alert of an Alertmanager group (or a single alert of a generic event)."""

    status: str
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    starts_at: str = ""
    ends_at: str = ""
    generator_url: str = ""
    fingerprint: str = ""


@dataclass(frozen=True)
class Event:
    """What a sender asks us to deliver. `kind` picks the template family."""

    kind: str
    title: str
    body: str = ""
    severity: str = "info"
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    to: tuple[str, ...] = ()
    channels: tuple[str, ...] = ()
    alerts: tuple[Alert, ...] = ()
    truncated_alerts: int = 0
    external_url: str = ""
    # Extra template values owned by the sender (e.g. a drill's reply code). Data, never source.
    extra: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "title": self.title,
            "body": self.body,
            "severity": self.severity,
            "labels": dict(self.labels),
            "annotations": dict(self.annotations),
            "to": list(self.to),
            "channels": list(self.channels),
            "alerts": [
                {
                    "status": a.status,
                    "labels": dict(a.labels),
                    "annotations": dict(a.annotations),
                    "starts_at": a.starts_at,
                    "ends_at": a.ends_at,
                    "generator_url": a.generator_url,
                    "fingerprint": a.fingerprint,
                }
                for a in self.alerts
            ],
            "truncated_alerts": self.truncated_alerts,
            "external_url": self.external_url,
            "extra": dict(self.extra),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Event:
        return cls(
            kind=str(data["kind"]),
            title=str(data["title"]),
            body=str(data.get("body", "")),
            severity=str(data.get("severity", "info")),
            labels={str(k): str(v) for k, v in data.get("labels", {}).items()},
            annotations={str(k): str(v) for k, v in data.get("annotations", {}).items()},
            to=tuple(str(x) for x in data.get("to", ())),
            channels=tuple(str(x) for x in data.get("channels", ())),
            alerts=tuple(
                Alert(
                    status=str(a.get("status", "")),
                    labels={str(k): str(v) for k, v in a.get("labels", {}).items()},
                    annotations={str(k): str(v) for k, v in a.get("annotations", {}).items()},
                    starts_at=str(a.get("starts_at", "")),
                    ends_at=str(a.get("ends_at", "")),
                    generator_url=str(a.get("generator_url", "")),
                    fingerprint=str(a.get("fingerprint", "")),
                )
                for a in data.get("alerts", ())
            ),
            truncated_alerts=int(data.get("truncated_alerts", 0)),
            external_url=str(data.get("external_url", "")),
            extra={str(k): str(v) for k, v in data.get("extra", {}).items()},
        )


@dataclass(frozen=True)
class Rendered:
    """A message rendered for one channel.

    `subject` is the email subject / push title; `text` the plain body; `html` the email HTML
    part; `params` the SMS template variables (Aliyun TemplateParam), already cut to length.
    """

    subject: str = ""
    text: str = ""
    html: str | None = None
    params: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Outgoing:
    """Everything a channel needs for one send. `delivery_id` is the provider's OutId."""

    delivery_id: str
    transaction_id: str
    address: str  # E.164 phone, email address or push token
    kind: str  # template family: alert, resolved, drill, digest ...
    rendered: Rendered
    # Sender-side data that rides along (push data payload, SMS SmsUpExtendCode ...).
    data: Mapping[str, str] = field(default_factory=dict)
    # Other OutIds this message may already have gone out under (a batch it was part of):
    # a maybe-sent look-up matches any of them.
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class Receipt:
    """What a provider said when it accepted a message."""

    provider_message_id: str  # Aliyun BizId, SMTP Message-ID, FCM message name
    request_id: str = ""
    detail: Mapping[str, str] = field(default_factory=dict)
    # When the provider took it, if it says so (epoch seconds; a look-up finds a send after the
    # fact); None: when send() returned.
    sent_at: float | None = None
