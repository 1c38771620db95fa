"""Ask the provider about SMS deliveries whose receipt never came (QuerySendDetails).

Receipt push may not be set up, or a push may have been lost after Aliyun's three re-pushes.
SMS deliveries `sent` for longer than `reconcile_after` are looked up, and an answer with a
final status is applied exactly like a receipt. Providers that cannot be asked (the sandbox)
are dropped from the index.
"""

from __future__ import annotations

import logging
import time

from notifier import awaiting
from notifier.channels.sms_aliyun import AliyunSms, send_dates
from notifier.errors import DeliveryError
from notifier.ledger import DeliveryRecord
from notifier.models import DeliveryStatus
from notifier.pipeline.deps import PipelineDeps
from notifier.receipts import Report, apply_report, resume_fallback

log = logging.getLogger(__name__)
GIVE_UP_AFTER = 3 * 86400.0  # Aliyun settles every message within 72 h
WAITING, FAILED, DELIVERED = 1, 2, 3  # QuerySendDetails SendStatus


def _ask_again_in(deps: PipelineDeps) -> float:
    return max(deps.settings.reconcile_after, 5.0)


def reconcile(deps: PipelineDeps, limit: int = 50, budget: float = 30.0) -> dict[str, int]:
    """One pass over the overdue deliveries, for at most `budget` seconds (well inside the
    task time limit: each query may take a read timeout); the rest waits for the next pass.
    Returns how many ended how."""
    client = deps.ledger.redis
    now = time.time()
    stop_at = time.monotonic() + budget
    after = deps.settings.reconcile_after
    counts: dict[str, int] = {}
    for did in awaiting.overdue(client, now - after, limit):
        if time.monotonic() > stop_at:
            break
        result = _reconcile_one(deps, did, now)
        counts[result] = counts.get(result, 0) + 1
        if result in ("waiting", "not_found", "error"):
            # Due again after another interval (the score is "sent at" for the cutoff).
            awaiting.ask_again(client, did, now - after + _ask_again_in(deps))
        elif result not in ("delivered", "failed"):
            awaiting.closed(client, did)
        if result in ("delivered", "failed", "duplicate", "stale"):
            deps.metrics.inc("notifier_receipts", channel="sms", result=f"query_{result}")
    return counts


def _ours(row: dict[str, object], rec: DeliveryRecord, by_biz: bool) -> bool:
    """OutId is our delivery ID (or the batch's it went out in); a query by BizId is ours even
    where OutId was not echoed."""
    out = str(row.get("OutId") or "")
    return out in (rec.id, rec.sent_as or rec.id) or (by_biz and not out)


def _provider(deps: PipelineDeps, rec: DeliveryRecord) -> AliyunSms | None:
    for provider in deps.providers.get("sms", ()):
        if provider.provider_name == rec.provider and isinstance(provider, AliyunSms):
            return provider
    return None


def _reconcile_one(deps: PipelineDeps, did: str, now: float) -> str:
    rec = deps.ledger.delivery(did)
    if rec is None or rec.channel != "sms" or rec.status != DeliveryStatus.SENT:
        if rec is not None:  # a failed receipt's worker may have died before its fallback
            resume_fallback(deps, rec)
        return "closed"  # a receipt (or something else) settled it meanwhile
    provider = _provider(deps, rec)
    if provider is None:
        return "unsupported"  # sandbox, or a provider since removed from the config
    sent_at = rec.sent_at or now
    if now - sent_at > GIVE_UP_AFTER:
        deps.ledger.log(rec.transaction_id, "receipt_missing", delivery=did,
                        detail="no receipt and no final status after 72 h")
        return "gave_up"
    phone = rec.address.split(",")[0]
    try:
        row = None
        for day in send_dates(sent_at, now):
            rows = deps.runner.run(provider.query_status(phone, day,
                                                         rec.provider_message_id or None))
            row = next((r for r in rows if _ours(r, rec, bool(rec.provider_message_id))), None)
            if row is not None:
                break
    except DeliveryError as exc:
        log.warning("QuerySendDetails for %s failed: %s", did, exc.code,
                    extra={"transaction_id": rec.transaction_id, "delivery_id": did,
                           "error_code": exc.code})
        return "error"
    if row is None:
        return "not_found"
    status = int(str(row.get("SendStatus") or WAITING))
    if status not in (FAILED, DELIVERED):
        return "waiting"
    report = Report(
        phone=phone, biz_id=rec.provider_message_id or f"query:{did}", out_id=did,
        success=status == DELIVERED, err_code=str(row.get("ErrCode") or ""),
        err_msg="QuerySendDetails", send_time=str(row.get("SendDate") or ""),
        report_time=str(row.get("ReceiveDate") or ""), source="query",
    )
    return apply_report(deps, report)
