"""Sandbox providers: messages go to a Redis outbox (`notifier outbox`) instead of the world.

The SMS sandbox can also push Aliyun-style SmsReport receipts to the API, so a whole drill runs
on one machine without a cloud account.
"""

from __future__ import annotations

import json
import time
from typing import ClassVar

from notifier.channels.base import Channel, ChannelContext, ChannelLimits
from notifier.config import SandboxProvider
from notifier.ids import ulid
from notifier.models import Outgoing, Receipt

OUTBOX_PREFIX = "ntf:sandbox:"
OUTBOX_KEEP = 1000
REPORTS = "ntf:sandbox:reports"  # receipts the sandbox scheduler pushes to report_url


def outbox_key(channel: str) -> str:
    return f"{OUTBOX_PREFIX}{channel}"


class _Sandbox(Channel):
    def __init__(self, config: SandboxProvider, context: ChannelContext) -> None:
        super().__init__(config.name)
        self.config = config
        self.redis = context.redis

    async def send(self, message: Outgoing) -> Receipt:
        message_id = f"sandbox-{ulid()}"
        entry = {
            "at": time.time(), "channel": self.channel, "provider_message_id": message_id,
            "transaction_id": message.transaction_id, "delivery_id": message.delivery_id,
            "to": message.address, "kind": message.kind, "subject": message.rendered.subject,
            "text": message.rendered.text, "html": message.rendered.html,
            "params": dict(message.rendered.params), "data": dict(message.data),
        }
        key = outbox_key(self.channel)
        pipe = self.redis.pipeline()
        pipe.lpush(key, json.dumps(entry, ensure_ascii=False))
        pipe.ltrim(key, 0, OUTBOX_KEEP - 1)
        if self.channel == "sms" and self.config.report_url:
            pipe.rpush(REPORTS, json.dumps({"url": self.config.report_url, "entry": entry}))
        pipe.execute()
        return Receipt(provider_message_id=message_id, request_id=message_id)


class SandboxSms(_Sandbox):
    channel: ClassVar[str] = "sms"
    limits: ClassVar[ChannelLimits] = ChannelLimits(address="phone", body_maxlen=500, max_batch=1000)


class SandboxEmail(_Sandbox):
    channel: ClassVar[str] = "email"
    limits: ClassVar[ChannelLimits] = ChannelLimits(address="email", body_maxlen=100_000,
                                                    title_maxlen=200)


class SandboxPush(_Sandbox):
    channel: ClassVar[str] = "push"
    limits: ClassVar[ChannelLimits] = ChannelLimits(address="push_token", body_maxlen=1000,
                                                    title_maxlen=100)


def read_outbox(context: ChannelContext, channel: str, limit: int = 20) -> list[dict[str, object]]:
    rows = context.redis.lrange(outbox_key(channel), 0, limit - 1)
    return [json.loads(row) for row in rows]
