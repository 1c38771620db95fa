"""SMS deliveries the provider accepted and no receipt has closed yet.

`Outcomes.sent` indexes every SMS it records: by send time (the reconciler asks the provider
about the ones overdue) and by BizId (a receipt without OutId still finds its delivery).
Kept apart from `receipts` so that the pipeline can index without importing the receipt
handling, which itself uses the pipeline's fallback.
"""

from __future__ import annotations

import redis
from redis.client import Pipeline

from notifier.inbox import text
from notifier.ledger import DeliveryRecord
from notifier.models import Receipt

AWAITING = "ntf:rcpt:awaiting"  # delivery id -> sent at (or when to ask again)
BIZ_PREFIX = "ntf:rcpt:biz:"  # BizId -> delivery id


def index_sent(pipe: Pipeline, rec: DeliveryRecord, receipt: Receipt, sent_at: float,
               retention: float) -> None:
    """Queued on the pipeline that records the send: indexed exactly when it is recorded."""
    if rec.channel != "sms":
        return
    pipe.zadd(AWAITING, {rec.id: sent_at})
    if receipt.provider_message_id:
        pipe.set(BIZ_PREFIX + receipt.provider_message_id, rec.id, ex=max(int(retention), 60))


def delivery_for_biz(client: redis.Redis, biz_id: str) -> str | None:
    found = client.get(BIZ_PREFIX + biz_id) if biz_id else None
    return text(found) or None


def overdue(client: redis.Redis, cutoff: float, limit: int = 50) -> list[str]:
    return [text(m) for m in client.zrangebyscore(AWAITING, "-inf", repr(cutoff), 0, limit)]


def has_overdue(client: redis.Redis, cutoff: float) -> bool:
    return bool(client.zcount(AWAITING, "-inf", repr(cutoff)))


def ask_again(client: redis.Redis, did: str, score: float) -> None:
    client.zadd(AWAITING, {did: score}, xx=True)


def closed(client: redis.Redis, did: str) -> None:
    client.zrem(AWAITING, did)
