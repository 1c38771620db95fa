"""Sandbox providers: messages go to a Redis outbox (`notifier outbox`) instead of the world.

The SMS sandbox can also push Aliyun-style SmsReport receipts to the API, so a whole drill runs
on one machine without a cloud account.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any, ClassVar
from urllib.parse import urlsplit

import httpx
import redis

from notifier.channels.base import Channel, ChannelContext, ChannelLimits
from notifier.config import SandboxProvider
from notifier.ids import ulid
from notifier.models import Outgoing, Receipt
from notifier.tokens import CALLBACK_TOKEN_ENV, token_from_env

OUTBOX_PREFIX = "ntf:sandbox:"
OUTBOX_KEEP = 1000
REPORTS = "ntf:sandbox:reports"  # receipts the sandbox scheduler pushes to report_url
REPORT_DELAY = 0.5  # seconds between "sending" and the receipt push, as a handset would take
REPORT_TRIES = 5  # pushes of one receipt before it is dropped (Aliyun: 1 + 3)
_CHINA = timezone(timedelta(hours=8))
log = logging.getLogger(__name__)


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


def aliyun_report(entry: dict[str, Any], now: float, phone: str) -> dict[str, Any]:
    """What Aliyun's SmsReport push says about a sandbox-'sent' SMS to `phone`: delivered."""
    def beijing(ts: float) -> str:
        return datetime.fromtimestamp(ts, _CHINA).strftime("%Y-%m-%d %H:%M:%S")

    return {
        "phone_number": phone.strip().lstrip("+"),  # Aliyun drops the '+' (86138...)
        "send_time": beijing(float(entry["at"])), "report_time": beijing(now),
        "success": True, "err_code": "DELIVERED", "err_msg": "用户接收成功", "sms_size": "1",
        "biz_id": entry["provider_message_id"], "out_id": entry["delivery_id"],
    }


Post = Callable[[str, list[dict[str, Any]]], bool]


def http_post(url: str, body: list[dict[str, Any]]) -> bool:
    """POST a push like Aliyun: JSON array; only HTTP 200 counts as received. NOTIFIER_CALLBACK_
    TOKEN is added as ?token= here, so it never has to sit in the config file."""
    target = httpx.URL(url)
    token = token_from_env(CALLBACK_TOKEN_ENV)  # as the API reads it, so that the two match
    if token and "token" not in target.params:
        target = target.copy_merge_params({"token": token})
    try:
        response = httpx.post(target, json=body, timeout=2.0)
    except httpx.HTTPError as exc:
        log.warning("sandbox receipt push to %s failed: %s", urlsplit(url).path,
                    type(exc).__name__)
        return False
    if response.status_code != 200:
        log.warning("sandbox receipt push to %s answered %d", urlsplit(url).path,
                    response.status_code)
    return response.status_code == 200


def push_reports(client: redis.Redis, post: Post = http_post, now: float | None = None,
                 limit: int = 50) -> int:
    """Push the SmsReports of sandbox SMS sent at least REPORT_DELAY ago; returns how many went
    out. Runs on the scheduler leader only, so popping without a claim is safe enough."""
    at = time.time() if now is None else now
    pushed = 0
    for _ in range(limit):
        head = client.lindex(REPORTS, 0)
        if head is None:
            break
        item = json.loads(head)
        if float(item["entry"]["at"]) + REPORT_DELAY > at:
            break  # FIFO: everything behind it is younger
        client.lpop(REPORTS)
        # One record per number (a batch went to several), in one push as Aliyun batches them.
        numbers = str(item["entry"]["to"]).split(",")
        reports = [aliyun_report(item["entry"], at, phone) for phone in numbers]
        if post(str(item["url"]), reports):
            pushed += 1
            continue
        tries = int(item.get("tries", 0)) + 1
        if tries < REPORT_TRIES:
            client.rpush(REPORTS, json.dumps({**item, "tries": tries}))
        else:
            log.warning("sandbox receipt for %s dropped after %d pushes",
                        item["entry"]["delivery_id"], tries)
        break  # the receiver is unwell: try again on the next round
    return pushed
