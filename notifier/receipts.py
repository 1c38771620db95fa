"""Aliyun delivery receipts (SmsReport): validate, store first, apply to the ledger later.

The callback stores each record under (biz_id, phone) and answers; a worker applies stored
records: `delivered` + `delivered_at`, or, for a failed receipt, the route's fallback exactly as
for a permanent send error. Aliyun pushes twice sometimes (dedup at store) and may push a
receipt before our worker has recorded the send (kept and re-applied, never dropped).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import redis
from pydantic import BaseModel, ConfigDict, Field

from notifier import awaiting
from notifier.channels.sms_aliyun import beijing_time
from notifier.config import E164
from notifier.inbox import Checked, Claimed, Inbox, check_records
from notifier.ledger import Attempt, DeliveryRecord, delivery_key, text
from notifier.ledger_counts import COUNTED, delivery_count_keys, delivery_series
from notifier.models import DeliveryStatus
from notifier.pipeline.deps import PipelineDeps
from notifier.pipeline.outcomes import Outcomes
from notifier.pipeline.rollup import finish_final

log = logging.getLogger(__name__)
INBOX = "rcpt"
FAILED_CLASS = "receipt"  # error_class of a delivery a failed receipt closed
_NOT_YET = {DeliveryStatus.QUEUED, DeliveryStatus.SENDING, DeliveryStatus.RETRYING,
            DeliveryStatus.DEFERRED}


class SmsReportIn(BaseModel):
    """One record of an Aliyun SmsReport push; unknown fields are ignored (Aliyun adds some)."""

    model_config = ConfigDict(extra="ignore")
    phone_number: E164 = Field(min_length=1, max_length=32)
    success: bool
    biz_id: str = Field(min_length=1, max_length=128)
    out_id: str = Field(default="", max_length=256)
    err_code: str = Field(default="", max_length=64)
    err_msg: str = Field(default="", max_length=500)
    send_time: str = Field(default="", max_length=32)
    report_time: str = Field(default="", max_length=32)
    sms_size: str | int = ""


@dataclass(frozen=True)
class Report:
    phone: str  # E.164
    biz_id: str
    out_id: str
    success: bool
    err_code: str = ""
    err_msg: str = ""
    send_time: str = ""
    report_time: str = ""
    source: str = "push"  # push (SmsReport) or query (QuerySendDetails, the reconciler)

    @property
    def member(self) -> str:
        return f"{self.biz_id}|{self.phone}"


def parse_reports(payload: Any) -> Checked[Report]:
    """An SmsReport body -> its reports and its invalid records; `InvalidPush` if not an
    array."""
    checked = check_records(payload, "SmsReport", SmsReportIn)
    reports = [Report(phone=rec.phone_number, biz_id=rec.biz_id, out_id=rec.out_id,
                      success=rec.success, err_code=rec.err_code, err_msg=rec.err_msg,
                      send_time=rec.send_time, report_time=rec.report_time)
               for rec in checked.records]
    return Checked(reports, checked.invalid)


def receipt_inbox(client: redis.Redis, retention: float) -> Inbox:
    return Inbox(client, INBOX, retention)


def store_reports(inbox: Inbox, reports: Sequence[Report]) -> tuple[int, int]:
    """Store first (atomically, all or nothing); returns (new, duplicates)."""
    fresh = inbox.store([(r.member, asdict(r)) for r in reports])
    new = sum(fresh)
    return new, len(fresh) - new


def _retry_delay(age: float) -> float:
    """An early receipt is tried again soon, then less often: 1 s ... 60 s."""
    return min(60.0, max(1.0, age / 2))


def apply_due(deps: PipelineDeps, limit: int = 200) -> dict[str, int]:
    """Apply every stored receipt that is due; returns how many ended how."""
    inbox = receipt_inbox(deps.ledger.redis, deps.settings.retention)
    counts: dict[str, int] = {}
    for item in inbox.claim(limit):
        result = _apply_claimed(deps, inbox, item)
        counts[result] = counts.get(result, 0) + 1
    return counts


def _apply_claimed(deps: PipelineDeps, inbox: Inbox, item: Claimed) -> str:
    try:
        report = Report(**{k: v for k, v in item.record.items() if k != "received_at"})
    except TypeError:  # stored by another version: it would fail on every claim
        log.error("a stored receipt has an unknown shape (fields: %s); dropped",
                  ", ".join(sorted(item.record)))
        inbox.done(item.member)
        return "invalid"
    result = apply_report(deps, report)
    if result == "early":
        age = time.time() - float(item.record.get("received_at", time.time()))
        if age < deps.settings.retention:
            inbox.later(item.member, time.time() + _retry_delay(age))
            return result
        result = "expired"  # its send never showed up within the retention period
        log.warning("receipt for %s dropped: no such delivery within retention",
                    report.out_id or report.biz_id)
    inbox.done(item.member)
    deps.metrics.inc("notifier_receipts", channel="sms", result=result)
    return result


def apply_report(deps: PipelineDeps, report: Report) -> str:
    """Apply one receipt; idempotent. Returns delivered | failed | other_send | duplicate |
    early | stale | mismatch."""
    ledger = deps.ledger
    rec = ledger.delivery(report.out_id) if report.out_id else None
    if rec is None:  # no OutId, or a batch's: find it by number
        did = awaiting.delivery_for(ledger.redis, report.out_id, report.biz_id, report.phone)
        rec = ledger.delivery(did) if did else None
    if rec is None:
        return "early"  # its send is not recorded yet (or it is not ours): keep it
    if rec.channel != "sms" or report.phone not in rec.address.split(","):
        log.warning("receipt names delivery %s but not its channel/number; ignored", rec.id,
                    extra={"transaction_id": rec.transaction_id, "delivery_id": rec.id})
        return "mismatch"
    status = DeliveryStatus(rec.status)
    if status in _NOT_YET:
        return "early"  # the provider has it, our worker has not recorded that yet
    if status is DeliveryStatus.SENT:
        if report.success:  # whichever of its sends it is about, that one reached the phone
            return _delivered(deps, rec, report)
        if report.biz_id and rec.provider_message_id and report.biz_id != rec.provider_message_id:
            return _other_send_failed(deps, rec, report)
        return _failed(deps, rec, report)
    if status is DeliveryStatus.DELIVERED:
        return "duplicate"
    if status is DeliveryStatus.FAILED and rec.error_class == FAILED_CLASS:
        resume_fallback(deps, rec)
        return "duplicate"
    return "stale"  # the delivery was closed some other way meanwhile


def resume_fallback(deps: PipelineDeps, rec: DeliveryRecord) -> None:
    """A failed receipt was being applied when its worker died: finish the fallback it started
    (fall_back is idempotent: successor IDs are deterministic). The receipt applied again does
    this, and so does the reconciler for a failure it applied itself (no push comes again)."""
    if rec.status != DeliveryStatus.FAILED or rec.error_class != FAILED_CLASS:
        return
    if _fallback_unfinished(deps, rec):
        Outcomes(deps).fall_back(rec, "receipt_failed", rec.error_code)
    elif rec.digest_of:
        # Failed with nowhere left to go: its last step, settling the digest's members, comes
        # after its own failure is written (finish_digest; idempotent).
        finish_final(deps.ledger, rec)


def _sent_series(rec: DeliveryRecord) -> str:
    return delivery_series(rec.channel, rec.provider, DeliveryStatus.SENT.value)


def _fallback_unfinished(deps: PipelineDeps, rec: DeliveryRecord) -> bool:
    """Failed by a receipt, but still counted as sent: the fallback the receipt started (which
    counts it failed or fallen_back in its last write) did not finish. Running it again for a
    finished one would count nothing more but log and record its failure twice."""
    counted = deps.ledger.redis.hget(delivery_key(rec.id), COUNTED)
    return counted is not None and text(counted) == _sent_series(rec)


def _set_if_sent(deps: PipelineDeps, rec: DeliveryRecord, outcome: str | None,
                 **fields: str) -> bool:
    """Write `fields` if the delivery is still sent (see SET_IF_STATUS); `outcome`: count it
    there, moved from sent, in the same script (None: its fallback will)."""
    count = "" if outcome is None else delivery_series(rec.channel, rec.provider, outcome)
    flat: list[str] = [DeliveryStatus.SENT.value, _sent_series(rec), count]
    for key, value in {**fields, "updated_at": repr(time.time())}.items():
        flat += [key, value]
    return bool(deps.ledger.set_if_status(keys=delivery_count_keys(rec.id), args=flat))


def _delivered(deps: PipelineDeps, rec: DeliveryRecord, report: Report) -> str:
    now = time.time()
    reported = beijing_time(report.report_time)
    # Aliyun's report_time has whole seconds and another clock: keep it between send and now.
    at = now if reported is None else min(now, max(rec.sent_at or reported, reported))
    delivered = DeliveryStatus.DELIVERED.value
    if not _set_if_sent(deps, rec, delivered, status=delivered, delivered_at=repr(at)):
        return "duplicate"  # someone else closed it between our read and now
    deps.ledger.record_attempt(rec.id, Attempt(
        at=now, provider=rec.provider, outcome="receipt", error_code=report.err_code,
        message=f"{report.source}: delivered at {report.report_time or '?'}",
        provider_message_id=report.biz_id,
    ))
    deps.ledger.log(rec.transaction_id, "receipt", delivery=rec.id, result="delivered",
                    source=report.source)
    awaiting.closed(deps.ledger.redis, rec.id)
    Outcomes(deps).finish(rec.transaction_id)
    return "delivered"


def _record_failure(deps: PipelineDeps, rec: DeliveryRecord, report: Report, outcome: str) -> None:
    """A failed receipt's line in the delivery's attempts."""
    deps.ledger.record_attempt(rec.id, Attempt(
        at=time.time(), provider=rec.provider, outcome=outcome,
        error_code=report.err_code or "UNKNOWN",
        message=f"{report.source}: {report.err_msg}"[:300], provider_message_id=report.biz_id,
    ))


def _other_send_failed(deps: PipelineDeps, rec: DeliveryRecord, report: Report) -> str:
    """A failed receipt for another send of this delivery than the one it records (an attempt
    that timed out, went out after all and was not found by the look-up, then sent again): it
    says nothing of the recorded send, whose own receipt decides; only noted."""
    _record_failure(deps, rec, report, "receipt_failed_other_send")
    return "other_send"


def _failed(deps: PipelineDeps, rec: DeliveryRecord, report: Report) -> str:
    code = report.err_code or "UNKNOWN"
    if not _set_if_sent(deps, rec, None, status=DeliveryStatus.FAILED.value, error_code=code,
                        error_class=FAILED_CLASS):
        return "duplicate"
    _record_failure(deps, rec, report, "receipt_failed")
    # Like a permanent send error: the route's next channel carries the message.
    Outcomes(deps).fall_back(rec, "receipt_failed", code)
    # Only now: until its fallback is done, the reconciler finds it there (resume_fallback).
    awaiting.closed(deps.ledger.redis, rec.id)
    return "failed"
