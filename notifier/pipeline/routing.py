"""Which recipients and channels an event goes to: the first matching route wins."""

from __future__ import annotations

import re
from dataclasses import dataclass

from notifier.config import Route, Settings
from notifier.models import Event


@dataclass(frozen=True)
class RoutePlan:
    recipients: tuple[str, ...]
    channels: tuple[str, ...]
    fallback: tuple[str, ...]
    route_index: int | None  # None when the event named its own recipients and channels


def routing_labels(event: Event, receiver: str = "") -> dict[str, str]:
    """Labels routes match on: the event's labels plus `severity`, `kind` and `receiver`."""
    labels = {"severity": event.severity, "kind": event.kind}
    if receiver:
        labels["receiver"] = receiver
    labels.update(event.labels)
    return labels


def route_matches(route: Route, labels: dict[str, str]) -> bool:
    # A missing label reads as "", as in Alertmanager: `match: {team: ""}` catches the unowned.
    if any(labels.get(name, "") != value for name, value in route.match.items()):
        return False
    return all(re.fullmatch(pattern, labels.get(name, "")) for name, pattern in route.match_re.items())


def expand_recipients(settings: Settings, names: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Group and recipient names -> recipient names, in order, each once."""
    seen: dict[str, None] = {}
    for name in names:
        for member in settings.groups.get(name, [name]):
            seen.setdefault(member, None)
    return tuple(seen)


def unknown_targets(settings: Settings, names: tuple[str, ...]) -> list[str]:
    return [n for n in names if n not in settings.recipients and n not in settings.groups]


def plan_route(settings: Settings, event: Event, receiver: str = "") -> RoutePlan | None:
    labels = routing_labels(event, receiver)
    for index, route in enumerate(settings.routes):
        if route_matches(route, labels):
            channels = event.channels or tuple(route.channels)
            fallback = tuple(c for c in route.fallback if c not in channels)
            recipients = expand_recipients(settings, event.to or tuple(route.to))
            return RoutePlan(recipients, tuple(channels), fallback, index)
    if event.to and event.channels:
        return RoutePlan(expand_recipients(settings, event.to), event.channels, (), None)
    return None
