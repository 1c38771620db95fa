"""What happens after a delivery step: sent, retry, defer, next provider, fallback, failed.

Every transition is recorded in the ledger (delivery fields + an attempt or log line) and the
fleet metrics, then the transaction's status is rolled up.
"""

from __future__ import annotations

import logging
import time

from notifier.awaiting import index_sent
from notifier.errors import DeliveryError
from notifier.ids import fallback_id
from notifier.ledger import Attempt, DeliveryRecord
from notifier.models import DeliveryStatus, Receipt
from notifier.pipeline.backoff import retry_delay
from notifier.pipeline.deps import PipelineDeps
from notifier.pipeline.digest import settle_members
from notifier.pipeline.fanout import addresses
from notifier.pipeline.rollup import finish_transaction
from notifier.tasks_spec import DELIVER, deliver_queue

log = logging.getLogger("notifier.delivery")


def _log(rec: DeliveryRecord, outcome: str, provider: str = "", code: str = "",
         detail: str = "") -> None:
    """One JSON line per delivery step, carrying its IDs (see notifier.logs); never a secret."""
    log.info("%s %s -> %s%s", rec.channel, outcome, rec.recipient, f": {detail}" if detail else "",
             extra={"transaction_id": rec.transaction_id, "delivery_id": rec.id,
                    "channel": rec.channel, "provider": provider or rec.provider or None,
                    "outcome": outcome, "error_code": code or None})


class Outcomes:
    def __init__(self, deps: PipelineDeps) -> None:
        self.deps = deps
        self.ledger = deps.ledger
        self.metrics = deps.metrics

    def sent(self, rec: DeliveryRecord, provider: str, receipt: Receipt, *, latency: float | None,
             outcome: str = "sent", accepted_at: float | None = None) -> str:
        now = time.time()
        pipe = self.ledger.redis.pipeline()  # one round trip for the record and its metrics
        self.ledger.update(
            rec.id, into=pipe, status=DeliveryStatus.SENT.value, provider=provider, sent_at=now,
            provider_message_id=receipt.provider_message_id, request_id=receipt.request_id,
            next_at=None, maybe_sent_at=None, error_code="", error_class="",
        )
        self.ledger.record_attempt(rec.id, Attempt(
            at=now, provider=provider, outcome=outcome,
            provider_message_id=receipt.provider_message_id,
            latency_ms=None if latency is None else round(latency * 1000, 3),
        ), into=pipe)
        self.metrics.inc("notifier_deliveries", into=pipe, channel=rec.channel, provider=provider,
                         outcome="sent")
        if outcome == "sent":
            self.metrics.inc("notifier_send_attempts", into=pipe, channel=rec.channel,
                             provider=provider, result="sent")
        if latency is not None:
            self.metrics.observe("notifier_provider_latency_seconds", latency, into=pipe,
                                 channel=rec.channel, provider=provider)
        if accepted_at is not None:
            self.metrics.observe("notifier_end_to_end_latency_seconds", now - accepted_at,
                                 into=pipe, channel=rec.channel)
        pipe.execute()
        index_sent(self.ledger.redis, rec, receipt, now, self.deps.settings.retention)
        _log(rec, outcome, provider)
        self._finish_all(rec, reached=True)
        return outcome

    def failed_send(self, rec: DeliveryRecord, provider: str, error: DeliveryError,
                    latency: float, started_at: float) -> str:
        """Route a classified provider failure: retry, next provider, or fallback."""
        cls = error.error_class.value
        self.metrics.inc("notifier_send_attempts", channel=rec.channel, provider=provider, result=cls)
        policy = self.deps.settings.channels[rec.channel].retry
        retry_at = None
        retrying = cls in ("transient", "maybe_sent") and rec.attempt < policy.max_attempts
        if retrying:
            retry_at = time.time() + retry_delay(policy, rec.attempt, error.retry_after)
        self.ledger.record_attempt(rec.id, Attempt(
            at=started_at, provider=provider, outcome=cls, error_code=error.code,
            message=error.message[:300], latency_ms=round(latency * 1000, 3), retry_at=retry_at,
        ))
        self.ledger.update(rec.id, error_code=error.code, error_class=cls, provider=provider)
        _log(rec, f"error:{cls}", provider, error.code, "retrying" if retry_at else "")
        if retry_at is not None:
            maybe = started_at if cls == "maybe_sent" else rec.maybe_sent_at
            self.ledger.update(rec.id, status=DeliveryStatus.RETRYING.value, next_at=retry_at,
                               maybe_sent_at=maybe)
            self.deps.timers.schedule(DELIVER, deliver_queue(rec.channel), rec.id, retry_at)
            self.metrics.inc("notifier_retries", channel=rec.channel, provider=provider,
                             error_class=cls)
            return "retrying"
        if cls in ("transient", "maybe_sent", "account"):
            reason = "retries_exhausted" if cls != "account" else "account_error"
            return self.next_provider(rec, reason, error.code)
        return self.fall_back(rec, cls, error.code)

    def deferred(self, rec: DeliveryRecord, until: float, scope: str) -> str:
        self.ledger.uncount_attempt(rec.id)
        self.ledger.update(rec.id, status=DeliveryStatus.DEFERRED.value, next_at=until)
        self.ledger.record_attempt(rec.id, Attempt(at=time.time(), provider="", outcome="deferred",
                                                   message=f"rate limit: {scope}", retry_at=until))
        self.deps.timers.schedule(DELIVER, deliver_queue(rec.channel), rec.id, until)
        self.metrics.inc("notifier_deferrals", channel=rec.channel, scope=scope)
        _log(rec, "deferred", detail=f"{scope} rate limit")
        return "deferred"

    def next_provider(self, rec: DeliveryRecord, reason: str, code: str = "") -> str:
        """Try the channel's next provider (another account or region) before falling back."""
        if rec.provider_index + 1 >= len(self.deps.providers[rec.channel]):
            return self.fall_back(rec, reason, code)
        nxt = rec.provider_index + 1
        name = self.deps.providers[rec.channel][nxt].provider_name
        self.ledger.update(rec.id, status=DeliveryStatus.QUEUED.value, provider_index=nxt,
                           attempt=0, next_at=None, maybe_sent_at=None, reason=reason)
        self.ledger.log(rec.transaction_id, "provider_fallback", delivery=rec.id,
                        to_provider=name, reason=reason, code=code)
        _log(rec, "next_provider", code=code, detail=f"to {name}: {reason}")
        self.metrics.inc("notifier_fallbacks", from_channel=rec.channel, to_channel=rec.channel,
                         reason=reason)
        self.deps.publisher.publish(DELIVER, [rec.id], deliver_queue(rec.channel))
        return "next_provider"

    def fall_back(self, rec: DeliveryRecord, reason: str, code: str = "") -> str:
        """Hand the message to the next channel of the route's fallback list, or fail it."""
        recipient = self.deps.settings.recipients.get(rec.recipient)
        chain = list(rec.fallback_chain)
        detail = f"{reason}: {code}" if code else reason
        while chain and recipient is not None:
            channel = chain.pop(0)
            found = addresses(recipient, channel)
            if not found:
                continue
            already = self._live_delivery(rec, channel)
            if already is not None:
                return self._mark_fallen_back(rec, channel, f"{detail} (carried by {already})", reason)
            successors = [
                DeliveryRecord(id=fallback_id(rec.id, k), transaction_id=rec.transaction_id,
                               channel=channel, recipient=rec.recipient, address=address,
                               kind=rec.kind, fallback_of=rec.id, fallback_chain=list(chain),
                               digest_of=list(rec.digest_of))
                for k, address in enumerate(found)
            ]
            for did in self.ledger.add_deliveries(successors):
                self.deps.publisher.publish(DELIVER, [did], deliver_queue(channel))
            return self._mark_fallen_back(rec, channel, detail, reason)
        self.ledger.update(rec.id, status=DeliveryStatus.FAILED.value, reason=detail, next_at=None)
        self.metrics.inc("notifier_deliveries", channel=rec.channel, provider=rec.provider or "-",
                         outcome="failed")
        self.ledger.log(rec.transaction_id, "delivery_failed", delivery=rec.id, reason=detail)
        _log(rec, "failed", code=code, detail=detail)
        self._finish_all(rec, reached=False)
        return "failed"

    def _live_delivery(self, rec: DeliveryRecord, channel: str) -> str | None:
        for other in self.ledger.deliveries(rec.transaction_id):
            if (other.recipient == rec.recipient and other.channel == channel
                    and other.status not in (DeliveryStatus.FAILED, DeliveryStatus.FALLEN_BACK)):
                return other.id
        return None

    def _mark_fallen_back(self, rec: DeliveryRecord, channel: str, detail: str, reason: str) -> str:
        self.ledger.update(rec.id, status=DeliveryStatus.FALLEN_BACK.value, reason=detail,
                           next_at=None)
        self.ledger.log(rec.transaction_id, "fallback", delivery=rec.id, from_channel=rec.channel,
                        to_channel=channel, reason=detail)
        _log(rec, "fallen_back", detail=f"to {channel}: {detail}")
        self.metrics.inc("notifier_fallbacks", from_channel=rec.channel, to_channel=channel,
                         reason=reason)
        self.metrics.inc("notifier_deliveries", channel=rec.channel, provider=rec.provider or "-",
                         outcome="fallen_back")
        self.finish(rec.transaction_id)
        self.ledger.close_open(rec.id)
        return "fallen_back"

    def _finish_all(self, rec: DeliveryRecord, reached: bool) -> None:
        """Roll up this delivery's transaction, and those of deliveries a digest carried."""
        txids = [rec.transaction_id]
        if rec.digest_of:
            txids += [t for t in settle_members(self.deps, rec, reached) if t not in txids]
        for txid in txids:
            self.finish(txid)
        self.ledger.close_open(rec.id, *rec.digest_of)

    def finish(self, txid: str) -> None:
        finish_transaction(self.ledger, self.metrics, txid)
