"""Request bodies: Alertmanager webhook v4 and the generic event."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

Name = Field(pattern=r"^[A-Za-z0-9_.@+\-]{1,64}$")


class AlertmanagerAlert(BaseModel):
    model_config = ConfigDict(extra="allow")
    status: Literal["firing", "resolved"]
    labels: dict[str, str]
    annotations: dict[str, str] = Field(default_factory=dict)
    startsAt: str = ""
    endsAt: str = ""
    generatorURL: str = ""
    fingerprint: str = ""


class AlertmanagerWebhook(BaseModel):
    """Alertmanager's webhook payload, version 4 (0.25).

    Transactions keep the body as received and every reader validates it again
    (notifier.sources.stored_event): a change here must still accept the bodies stored within
    `retention`, or their events could not be read."""

    model_config = ConfigDict(extra="allow")
    version: str
    receiver: str
    status: Literal["firing", "resolved"]
    alerts: list[AlertmanagerAlert] = Field(min_length=1, max_length=5000)
    groupLabels: dict[str, str] = Field(default_factory=dict)
    commonLabels: dict[str, str] = Field(default_factory=dict)
    commonAnnotations: dict[str, str] = Field(default_factory=dict)
    externalURL: str = ""
    groupKey: str
    # Bounded so that it fits the dedup key's JSON (orjson: 64-bit integers); Alertmanager's
    # is a uint64 count of alerts left out, never near the bound.
    truncatedAlerts: int = Field(default=0, ge=0, le=2**63 - 1)


class AlertFields(Protocol):
    """What accepting a webhook reads of an alert (see WebhookFields)."""

    @property
    def status(self) -> str: ...
    @property
    def labels(self) -> Mapping[str, str]: ...
    @property
    def fingerprint(self) -> str: ...
    @property
    def startsAt(self) -> str: ...


class WebhookFields(Protocol):
    """What accepting a webhook reads of it: an AlertmanagerWebhook, or the API's first-pass
    decoding of the same body (notifier.api.first_pass), which has the same fields."""

    @property
    def version(self) -> str: ...
    @property
    def receiver(self) -> str: ...
    @property
    def status(self) -> str: ...
    @property
    def groupKey(self) -> str: ...
    @property
    def truncatedAlerts(self) -> int: ...
    @property
    def alerts(self) -> Sequence[AlertFields]: ...


class EventIn(BaseModel):
    """The body of POST /v1/events and what `notify()` takes."""

    model_config = ConfigDict(extra="forbid")
    # `kind` names a template family, so it is restricted to a safe file-name alphabet.
    kind: str = Field(default="alert", pattern=r"^[a-z][a-z0-9_-]{0,31}$",
                      description="the template family (alert, resolved, or one of your own); "
                                  "drill and digest are notifier's own, refused here "
                                  "(notifier.intake.RESERVED_KINDS)")
    title: str = Field(min_length=1, max_length=500)
    body: str = Field(default="", max_length=20_000)
    severity: str = Field(default="info", pattern=r"^[A-Za-z0-9_-]{1,32}$")
    labels: dict[str, str] = Field(default_factory=dict, max_length=100)
    annotations: dict[str, str] = Field(default_factory=dict, max_length=100)
    to: list[str] = Field(default_factory=list, max_length=200)
    channels: list[Literal["sms", "email", "push"]] = Field(default_factory=list)
