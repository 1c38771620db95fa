"""A send the provider took, and Redis gone (a failover, a restart) right as it is recorded, on
a real redis-server stopped and started again: the send is recorded once Redis is back, never
sent a second time. Email has no look-up: a delivery left `sending` is taken over later as
maybe sent and mailed again."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from email.message import EmailMessage

import pytest

from notifier.models import Event, Source
from tests.fakes.smtp import FakeSmtp
from tests.support.inline import InlineFleet
from tests.support.servers import RedisServer


class RedisGoesAwayOnArrival(FakeSmtp):
    """A mail server that queues the first message, and right then the ledger's Redis stops,
    to start again a second later."""

    def __init__(self, server: RedisServer) -> None:
        super().__init__()
        self.server = server
        self.restart: threading.Timer | None = None

    def _record(self, message: EmailMessage, mail_from: str, rcpt_tos: list[str]) -> None:
        super()._record(message, mail_from, rcpt_tos)
        if self.restart is None:
            self.server.stop()
            self.restart = threading.Timer(1.0, self.server.start)
            self.restart.start()


@pytest.fixture
def smtp(private_redis: RedisServer) -> Iterator[RedisGoesAwayOnArrival]:
    fake = RedisGoesAwayOnArrival(private_redis)
    fake.start()
    yield fake
    if fake.restart is not None:
        fake.restart.join()
    fake.stop()


def test_a_send_whose_record_meets_a_redis_outage_is_recorded_not_sent_again(
        private_redis: RedisServer, smtp: RedisGoesAwayOnArrival) -> None:
    fleet = InlineFleet(private_redis.url, {
        "channels": {"email": {"provider": "smtp", "host": "127.0.0.1", "port": smtp.port,
                               "sender": "notifier@example.com", "timeout": "5s"}},
        "recipients": {"alice": {"email": "alice@example.com"}},
        "routes": [{"match": {}, "to": ["alice"], "channels": ["email"]}],
    })
    try:
        txid = fleet.intake.submit(Event(kind="alert", title="DiskFull"), Source.API).transaction_id
        fleet.drain()
        assert smtp.restart is not None  # the outage did happen, after the message was queued
        tx = fleet.deps.ledger.transaction(txid)
        assert tx is not None and tx.status == "delivered"
        [delivery] = fleet.deps.ledger.deliveries(txid)
        assert delivery.status == "sent"
        assert len(smtp.messages) == 1
    finally:
        fleet.close()
