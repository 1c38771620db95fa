"""SMS deliveries the provider accepted and no receipt has closed yet.

`Outcomes.sent` indexes every SMS it records: by send time (the reconciler asks the provider
about the ones overdue) and by BizId (a receipt without OutId still finds its delivery; a
batch's members by OutId or BizId and number).
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
BIZ_PREFIX = "ntf:rcpt:biz:"  # BizId -> delivery id; BizId|phone for a member of a batch
OUT_PREFIX = "ntf:rcpt:out:"  # a batch's OutId|phone -> the member's delivery id


def index_sent(pipe: Pipeline, rec: DeliveryRecord, receipt: Receipt, sent_at: float,
               retention: float) -> None:
    """Queued on the pipeline that records the send: indexed exactly when it is recorded.

    A member of a batch request (several numbers, one OutId and one BizId: `rec.sent_as`) is
    indexed by its number as well, which is how its receipt tells it from the others."""
    if rec.channel != "sms":
        return
    keep = max(int(retention), 60)
    pipe.zadd(AWAITING, {rec.id: sent_at})
    member = f"|{rec.address}" if rec.sent_as else ""
    if receipt.provider_message_id:
        pipe.set(BIZ_PREFIX + receipt.provider_message_id + member, rec.id, ex=keep)
    if rec.sent_as:
        pipe.set(OUT_PREFIX + rec.sent_as + member, rec.id, ex=keep)


def delivery_for(client: redis.Redis, out_id: str, biz_id: str, phone: str) -> str | None:
    """The delivery a receipt is about when its OutId is not a delivery id: a batch member by
    OutId or BizId and number, else a single send by BizId (a receipt without OutId)."""
    # BizId and number first: unique per request and number, as Aliyun keys its receipts.
    keys = [BIZ_PREFIX + f"{biz_id}|{phone}"] if biz_id else []
    if out_id:
        keys.append(OUT_PREFIX + f"{out_id}|{phone}")
    if biz_id:
        keys.append(BIZ_PREFIX + biz_id)
    found = next((value for value in client.mget(keys) if value), None) if keys else None
    return text(found) or None


def overdue(client: redis.Redis, cutoff: float, limit: int = 50) -> list[str]:
    return [text(m) for m in client.zrangebyscore(AWAITING, "-inf", repr(cutoff), 0, limit)]


def has_overdue(client: redis.Redis, cutoff: float) -> bool:
    return bool(client.zcount(AWAITING, "-inf", repr(cutoff)))


def ask_again(client: redis.Redis, did: str, score: float) -> None:
    client.zadd(AWAITING, {did: score}, xx=True)


def closed(client: redis.Redis, did: str) -> None:
    client.zrem(AWAITING, did)
