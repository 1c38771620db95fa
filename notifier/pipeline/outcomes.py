"""What happens after a delivery step: sent, retry, defer, next provider, fallback, failed.

Every transition is recorded in the ledger (delivery fields + an attempt or log line) and the
fleet metrics, then the transaction's status is rolled up.
"""

from __future__ import annotations

import logging
import time

from redis.client import Pipeline

from notifier.awaiting import index_sent
from notifier.config import Recipient
from notifier.errors import DeliveryError
from notifier.ids import fallback_id
from notifier.ledger import Attempt, DeliveryRecord
from notifier.ledger_counts import count_delivery
from notifier.models import DeliveryStatus, Receipt
from notifier.pipeline.backoff import retry_delay
from notifier.pipeline.deps import PipelineDeps
from notifier.pipeline.fanout import addresses
from notifier.pipeline.rollup import finish_digest, finish_transaction
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
             outcome: str = "sent", accepted_at: float | None = None,
             into: Pipeline | None = None, execute: bool = True) -> str:
        """`into`: a pipeline with writes of the same step already queued (the breaker's);
        `execute=False` leaves them queued there, for the other members of a batch request to
        join (the caller executes it; a digest's writes run at once, its roll-up reads them)."""
        now = time.time()
        # A send found by a look-up went out earlier, when the provider says (never later than
        # now: its clock is not ours).
        sent_at = now if receipt.sent_at is None else min(now, receipt.sent_at)
        # One round trip for the record, its metrics, its receipt index and the roll-up's read.
        pipe = into if into is not None else self.ledger.redis.pipeline()
        self.ledger.update(
            rec.id, into=pipe, status=DeliveryStatus.SENT.value, provider=provider,
            sent_at=sent_at,
            provider_message_id=receipt.provider_message_id, request_id=receipt.request_id,
            next_at=None, maybe_sent_at=None, after_lookup=None, error_code="", error_class="",
            sent_as=rec.sent_as or None,  # the OutId it went under, if not its own id
        )
        self.ledger.record_attempt(rec.id, Attempt(
            at=now, provider=provider, outcome=outcome,
            provider_message_id=receipt.provider_message_id,
            latency_ms=None if latency is None else round(latency * 1000, 3),
        ), into=pipe)
        count_delivery(pipe, rec.id, channel=rec.channel, provider=provider, outcome="sent")
        if outcome == "sent":
            self.metrics.inc("notifier_send_attempts", into=pipe, channel=rec.channel,
                             provider=provider, result="sent")
        if latency is not None:
            self.metrics.observe("notifier_provider_latency_seconds", latency, into=pipe,
                                 channel=rec.channel, provider=provider)
        if accepted_at is not None:
            self.metrics.observe("notifier_end_to_end_latency_seconds",
                                 max(sent_at - accepted_at, 0.0), into=pipe, channel=rec.channel)
        index_sent(pipe, rec, receipt, sent_at, self.deps.settings.retention)
        self._finish_all(rec, pipe, reached=True, execute=execute or into is None)
        _log(rec, outcome, provider)
        return outcome

    def failed_send(self, rec: DeliveryRecord, provider: str, error: DeliveryError,
                    latency: float, started_at: float) -> str:
        """Route a classified provider failure: retry, next provider, or fallback."""
        cls = error.error_class.value
        pipe = self.ledger.redis.pipeline()  # the attempt, its error and its metrics: one write
        self.metrics.inc("notifier_send_attempts", into=pipe, channel=rec.channel,
                         provider=provider, result=cls)
        policy = self.deps.settings.channels[rec.channel].retry
        retry_at = None
        retrying = cls in ("transient", "maybe_sent") and rec.attempt < policy.max_attempts
        # The last attempt may have been sent: before another provider or channel sends it
        # again, one more claim of this one looks it up (prepare), after a backoff like a
        # retry's, which also gives the provider's records time to show the send. A provider
        # without a look-up (SMTP, FCM) moves on at once, as its retries running out would.
        looking_up = (cls == "maybe_sent" and not retrying
                      and self.deps.providers[rec.channel][rec.provider_index].can_look_up)
        if retrying or looking_up:
            retry_at = time.time() + retry_delay(policy, rec.attempt, error.retry_after)
        self.ledger.record_attempt(rec.id, Attempt(
            at=started_at, provider=provider, outcome=cls, error_code=error.code,
            message=error.message[:300], latency_ms=round(latency * 1000, 3), retry_at=retry_at,
        ), into=pipe)
        _log(rec, f"error:{cls}", provider, error.code,
             "looking it up" if looking_up else "retrying" if retrying else "")
        if retry_at is not None:
            maybe = started_at if cls == "maybe_sent" else rec.maybe_sent_at
            self.ledger.update(rec.id, into=pipe, error_code=error.code, error_class=cls,
                               provider=provider, status=DeliveryStatus.RETRYING.value,
                               next_at=retry_at, maybe_sent_at=maybe,
                               after_lookup="retries_exhausted" if looking_up else None)
            if retrying:
                self.metrics.inc("notifier_retries", into=pipe, channel=rec.channel,
                                 provider=provider, error_class=cls)
            pipe.execute()
            self.deps.timers.schedule(DELIVER, deliver_queue(rec.channel), rec.id, retry_at)
            return "retrying" if retrying else "looking_up"
        self.ledger.update(rec.id, into=pipe, error_code=error.code, error_class=cls,
                           provider=provider)
        pipe.execute()
        if cls in ("transient", "maybe_sent", "account"):
            reason = "retries_exhausted" if cls != "account" else "account_error"
            return self.next_provider(rec, reason, error.code)
        return self.fall_back(rec, cls, error.code)

    def batch_refused(self, members: list[DeliveryRecord], provider: str, error: DeliveryError,
                      latency: float, started_at: float) -> None:
        """A request carrying several recipients was refused for what may be one number's fault:
        the attempt on each member's record (its own request follows)."""
        cls = error.error_class.value
        pipe = self.ledger.redis.pipeline()
        self.metrics.inc("notifier_send_attempts", amount=len(members), into=pipe,
                         channel=members[0].channel, provider=provider, result=cls)
        for rec in members:
            self.ledger.record_attempt(rec.id, Attempt(
                at=started_at, provider=provider, outcome="batch_refused", error_code=error.code,
                message=error.message[:300], latency_ms=round(latency * 1000, 3),
            ), into=pipe)
            _log(rec, "batch_refused", provider, error.code, "sending in smaller requests")
        pipe.execute()

    def deferred(self, rec: DeliveryRecord, until: float, scope: str) -> str:
        pipe = self.ledger.redis.pipeline()
        self.ledger.uncount_attempt(rec.id, into=pipe)
        self.ledger.update(rec.id, into=pipe, status=DeliveryStatus.DEFERRED.value, next_at=until)
        self.ledger.record_attempt(rec.id, Attempt(at=time.time(), provider="", outcome="deferred",
                                                   message=f"rate limit: {scope}", retry_at=until),
                                   into=pipe)
        self.metrics.inc("notifier_deferrals", into=pipe, channel=rec.channel, scope=scope)
        pipe.execute()
        self.deps.timers.schedule(DELIVER, deliver_queue(rec.channel), rec.id, until)
        _log(rec, "deferred", detail=f"{scope} rate limit")
        return "deferred"

    def not_found_after_lookup(self, rec: DeliveryRecord, provider: str) -> str:
        """The look-up after a maybe-sent last attempt found nothing: move on as its retries
        running out would have. A look-up that could not ask (QuerySendDetails down or not
        allowed) also says not found: then a possible duplicate on the next provider or channel
        beats an alert that never goes out (the rule of every look-up, Channel.lookup)."""
        pipe = self.ledger.redis.pipeline()
        self.ledger.uncount_attempt(rec.id, into=pipe)  # the claim sent nothing
        self.ledger.record_attempt(rec.id, Attempt(at=time.time(), provider=provider,
                                                   outcome="not_found_after_timeout"), into=pipe)
        pipe.execute()
        _log(rec, "not_found_after_timeout", provider, rec.error_code)
        return self.next_provider(rec, rec.after_lookup, rec.error_code)

    def next_provider(self, rec: DeliveryRecord, reason: str, code: str = "") -> str:
        """Try the channel's next provider (another account or region) before falling back."""
        if rec.provider_index + 1 >= len(self.deps.providers[rec.channel]):
            return self.fall_back(rec, reason, code)
        nxt = rec.provider_index + 1
        name = self.deps.providers[rec.channel][nxt].provider_name
        pipe = self.ledger.redis.pipeline()
        self.ledger.update(rec.id, into=pipe, status=DeliveryStatus.QUEUED.value,
                           provider_index=nxt, attempt=0, next_at=None, maybe_sent_at=None,
                           after_lookup=None, reason=reason)
        self.ledger.log(rec.transaction_id, "provider_fallback", into=pipe, delivery=rec.id,
                        to_provider=name, reason=reason, code=code)
        self.metrics.inc("notifier_fallbacks", into=pipe, from_channel=rec.channel,
                         to_channel=rec.channel, reason=reason)
        pipe.execute()
        _log(rec, "next_provider", code=code, detail=f"to {name}: {reason}")
        self.deps.publisher.publish(DELIVER, [rec.id], deliver_queue(rec.channel))
        return "next_provider"

    def fall_back(self, rec: DeliveryRecord, reason: str, code: str = "") -> str:
        """Hand the message to the next channel of the route's fallback list, or fail it; unless
        another live delivery to the person carries it already."""
        detail = f"{reason}: {code}" if code else reason
        hop = _next_reachable(self.deps.settings.recipients.get(rec.recipient), rec.fallback_chain)
        channel, successors = None, []
        if hop is not None:
            channel, found, rest = hop
            successors = [_successor(rec, channel, address, k, rest) for k, address in enumerate(found)]
        # Checked and created in one script (Ledger.add_fallback): another live delivery to the
        # person on this channel (their other device) or on the next may carry the message.
        carrier, created = self.ledger.add_fallback(rec, channel, successors)
        if carrier is not None:
            carrier_id, carrier_channel = carrier
            return self._mark_fallen_back(rec, carrier_channel, f"{detail} (carried by {carrier_id})",
                                          reason)
        if channel is not None:
            for did in created:
                self.deps.publisher.publish(DELIVER, [did], deliver_queue(channel))
            return self._mark_fallen_back(rec, channel, detail, reason)
        pipe = self.ledger.redis.pipeline()
        self.ledger.update(rec.id, into=pipe, status=DeliveryStatus.FAILED.value, reason=detail,
                           next_at=None)
        count_delivery(pipe, rec.id, channel=rec.channel, provider=rec.provider, outcome="failed")
        self.ledger.log(rec.transaction_id, "delivery_failed", into=pipe, delivery=rec.id,
                        reason=detail)
        self._finish_all(rec, pipe, reached=False)
        _log(rec, "failed", code=code, detail=detail)
        return "failed"

    def _mark_fallen_back(self, rec: DeliveryRecord, channel: str, detail: str, reason: str) -> str:
        pipe = self.ledger.redis.pipeline()
        self.ledger.update(rec.id, into=pipe, status=DeliveryStatus.FALLEN_BACK.value,
                           reason=detail, next_at=None)
        self.ledger.log(rec.transaction_id, "fallback", into=pipe, delivery=rec.id,
                        from_channel=rec.channel, to_channel=channel, reason=detail)
        self.metrics.inc("notifier_fallbacks", into=pipe, from_channel=rec.channel,
                         to_channel=channel, reason=reason)
        count_delivery(pipe, rec.id, channel=rec.channel, provider=rec.provider,
                       outcome="fallen_back")
        finish_transaction(self.ledger, rec.transaction_id, close=[rec.id], into=pipe)
        pipe.execute()
        _log(rec, "fallen_back", detail=f"to {channel}: {detail}")
        return "fallen_back"

    def _finish_all(self, rec: DeliveryRecord, pipe: Pipeline, reached: bool,
                    execute: bool = True) -> None:
        """Run the step's writes queued on `pipe`, then roll up this delivery's transaction, and
        (a digest) settle the deliveries it carried and roll up theirs; all then leave the open
        index.
        `execute=False`: only queue this delivery's roll-up on `pipe` (not for a digest)."""
        if not rec.digest_of:  # the common case: the roll-up rides on the same round trip
            finish_transaction(self.ledger, rec.transaction_id, close=[rec.id], into=pipe)
            if execute:
                pipe.execute()
            return
        pipe.execute()
        finish_digest(self.ledger, rec, reached)

    def finish(self, txid: str) -> None:
        finish_transaction(self.ledger, txid)


def _next_reachable(recipient: Recipient | None, chain: list[str]
                    ) -> tuple[str, list[str], list[str]] | None:
    """The first channel of `chain` that reaches the recipient: (it, their addresses there, the
    channels after it); None if none does."""
    if recipient is None:
        return None
    for i, channel in enumerate(chain):
        if found := addresses(recipient, channel):
            return channel, found, chain[i + 1:]
    return None


def _successor(rec: DeliveryRecord, channel: str, address: str, k: int, chain: list[str]
               ) -> DeliveryRecord:
    """What carries `rec` on to `channel` (its id is deterministic: a rerun adds nothing)."""
    return DeliveryRecord(id=fallback_id(rec.id, k), transaction_id=rec.transaction_id,
                          channel=channel, recipient=rec.recipient, address=address, kind=rec.kind,
                          fallback_of=rec.id, fallback_chain=list(chain),
                          digest_of=list(rec.digest_of))
