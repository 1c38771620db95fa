"""Operator actions shared by the API and the CLI: breakers and dead-letter replay."""

from __future__ import annotations

import redis

from notifier.breaker import BreakerStatus, FleetBreaker, list_breakers
from notifier.config import Settings
from notifier.errors import NotifierError
from notifier.intake import Intake
from notifier.ledger import Ledger
from notifier.ledger_rows import Unreadable


class BreakerControl:
    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.redis = client
        self.settings = settings

    def known(self) -> list[str]:
        return [f"{channel}:{p.name}" for channel, cfg in self.settings.channels.items()
                for p in cfg.providers]

    def breaker(self, name: str) -> FleetBreaker:
        channel = name.split(":", 1)[0]
        return FleetBreaker(self.redis, name, self.settings.channels[channel].breaker)

    def list(self) -> list[BreakerStatus]:
        seen = {s.name: s for s in list_breakers(self.redis)}
        return [seen.get(name) or self.breaker(name).status() for name in self.known()]

    def apply(self, name: str, action: str, by: str, reason: str) -> BreakerStatus:
        breaker = self.breaker(name)
        if action == "open":
            breaker.force_open(by, reason)
        elif action == "close":
            breaker.force_close(by, reason)
        else:
            breaker.reset(by)
        return breaker.status()


class Unreplayable(NotifierError):
    """A dead letter whose stored event cannot be read: there is nothing to send again."""


def replay_dead_letter(ledger: Ledger, intake: Intake, txid: str) -> str | None:
    """Send a failed transaction's event again as a new transaction linked to the old one."""
    tx = ledger.transaction_or_unreadable(txid)
    if isinstance(tx, Unreadable):
        raise Unreplayable(f"{txid} cannot be replayed: {tx.detail}")
    if tx is None:
        return None
    # The dead letter leaves its list only together with the replay's acceptance: a replay the
    # current config refuses (a renamed group: InvalidEvent) or a Redis failure keeps it.
    accepted = intake.replay(tx.event, txid, receiver=tx.receiver)
    if accepted is None:
        return None
    ledger.log(txid, "replayed", new_transaction=accepted.transaction_id)
    ledger.log(accepted.transaction_id, "replay_of", original=txid)
    return accepted.transaction_id
