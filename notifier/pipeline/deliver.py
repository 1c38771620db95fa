"""One delivery step: claim → (look up a maybe-sent) → render → rate limit → breaker → send.
Several deliveries go out in one request where their provider allows (`batching.by_request`):
those of one event's task (deliver_batch), and those a dispatch sends for the events of its
message (`prepare`, then `send_prepared` for all of them).

Plain Python: the Celery task calls `deliver(deps, delivery_id, token)` and nothing more; the
dispatch step calls it too, for the one delivery it sends itself (with the transaction it has).
"""

from __future__ import annotations

import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, replace
from typing import Any

from notifier.breaker import FleetBreaker, Permit
from notifier.channels.base import Channel
from notifier.config import AliyunSmsProvider, ChannelConfig
from notifier.errors import CircuitOpen, DeliveryError, MaybeSentError, PermanentError
from notifier.ids import batch_out_id
from notifier.ledger import ClaimResult, DeliveryRecord, TransactionRecord
from notifier.ledger_rows import Unreadable
from notifier.models import Event, Outgoing, Receipt, Rendered
from notifier.pipeline.batching import by_request
from notifier.pipeline.deps import PipelineDeps
from notifier.pipeline.digest import NEVER_MERGED, hold
from notifier.pipeline.outcomes import Outcomes
from notifier.pipeline.redis_wait import until_redis_answers
from notifier.pipeline.rollup import finish_final
from notifier.ratelimit import Bucket, Decision
from notifier.templates import TemplateContext

# How long a send the provider took waits for Redis to record it (a failover, a restart). A step
# already near its soft time limit may still be cut short first, and is then maybe sent.
RECORD_WAIT = 20.0


@dataclass(frozen=True)
class Ready:
    """A claimed delivery that passed every step before the provider call."""
    rec: DeliveryRecord
    tx: TransactionRecord
    provider: Channel
    message: Outgoing
    breaker: FleetBreaker
    permit: Permit | None  # read with the rate-limit take; None: ask `breaker.acquire`
    taken: Decision  # its rate-limit take, given back if no request is made


def deliver(deps: PipelineDeps, did: str, token: str, tx: TransactionRecord | None = None) -> str:
    """Advance one delivery by one step; returns what happened (for logs and tests).

    `token` identifies this attempt: a redelivery of the same task message carries the same one
    and may take over a claim its dead predecessor left. `tx`: the delivery's transaction, when
    the caller has it in hand (the claim then does not read it again)."""
    ready = prepare(deps, did, token, tx)
    return ready if isinstance(ready, str) else _send(deps, [ready], one_text=True)[0]


def deliver_batch(deps: PipelineDeps, dids: Sequence[str], token: str,
                  tx: TransactionRecord | None = None) -> list[str]:
    """`deliver` for several deliveries of one event (dispatch groups them: see
    notifier.pipeline.batching). Each is claimed, looked up and rate limited on its own; those
    left go out in as few requests as their provider allows."""
    if len(dids) == 1:  # the common case: nothing to group
        return [deliver(deps, dids[0], token, tx)]
    results: dict[str, str] = {}
    ready: list[Ready] = []
    for did in dids:
        prepared = prepare(deps, did, token, tx)
        if isinstance(prepared, str):
            results[did] = prepared
            continue
        ready.append(prepared)
        tx = tx or prepared.tx  # members share it: read once
    results.update(send_prepared(deps, ready))
    return [results[did] for did in dids]


def send_prepared(deps: PipelineDeps, ready: Sequence[Ready]) -> dict[str, str]:
    """Send prepared deliveries (of one event or several) in as few requests as their providers
    allow; what happened to each, by delivery id."""
    results: dict[str, str] = {}
    for request in by_request(ready, lambda r: r.provider, lambda r: r.message):
        for member, result in zip(request.members, _send(deps, request.members, request.one_text),
                                  strict=True):
            results[member.rec.id] = result
    return results


def prepare(deps: PipelineDeps, did: str, token: str, tx: TransactionRecord | None
            ) -> Ready | str:
    """Claim → (look up a maybe-sent) → render → rate limit: the delivery ready to send, or
    what happened to it instead."""
    claim = deps.ledger.claim(did, token, deps.claim_lease, with_transaction=tx is None)
    result, rec = claim.result, claim.delivery
    if result is ClaimResult.DONE:
        # A redelivered task: the worker that finished the send may have died before the
        # roll-up (and a digest's, before settling its members), so do it (idempotently) here.
        if rec is not None:
            finish_final(deps.ledger, rec)
        return result.value
    if result is not ClaimResult.CLAIMED and result is not ClaimResult.RECLAIMED:
        return result.value
    tx_or_unreadable = tx or claim.transaction
    outcomes = Outcomes(deps)
    if rec is None or tx_or_unreadable is None:
        return "missing"
    if isinstance(tx_or_unreadable, Unreadable):
        # Became unreadable after its deliveries were queued (damage, a schema that moved on):
        # no message can be built from it, on this channel or any other, as with a broken
        # template; this ends the delivery instead of failing every attempt until retention.
        return outcomes.fall_back(rec, "unreadable", tx_or_unreadable.detail)
    tx = tx_or_unreadable
    if result is ClaimResult.RECLAIMED and deps.ledger.fallback_started(rec.id):
        # Its holder died inside `fall_back`, after the step that hands the message on (a
        # successor created, or another delivery found carrying it): finish that fallback
        # (idempotent), never send it here as well, which paged the person on both channels.
        return outcomes.fall_back(rec, rec.error_class or "resumed", rec.error_code)
    if not rec.address:
        return outcomes.fall_back(rec, "no_address")
    # A channel taken out of the config since this delivery was made has none: it falls back
    # (as one whose provider was removed does) instead of raising on every claim for ever.
    providers = deps.providers.get(rec.channel, [])
    if rec.provider_index >= len(providers):
        return outcomes.fall_back(rec, "no_provider")
    cfg = deps.settings.channels[rec.channel]
    provider = providers[rec.provider_index]
    try:
        message = _message(deps, rec, tx, cfg)
    except PermanentError as exc:
        return outcomes.fall_back(rec, "template", exc.message)

    maybe_since = rec.maybe_sent_at
    if result is ClaimResult.RECLAIMED and maybe_since is None:
        # The last holder died mid-send: the provider may have the message already.
        maybe_since = (rec.claim_at or time.time()) - deps.claim_lease * 2
    if maybe_since is not None:
        found = deps.runner.run(provider.lookup(message, maybe_since))
        if found is not None:
            if (matched := found.detail.get("OutId")) is not None:  # which request it went in
                rec = replace(rec, sent_as="" if matched == rec.id else matched)
            return outcomes.sent(rec, provider.provider_name, found, latency=None,
                                 outcome="found_after_timeout", accepted_at=tx.created_at)
    if rec.after_lookup:  # claimed only to look up a maybe-sent last attempt: move on
        return outcomes.not_found_after_lookup(rec, provider.provider_name)

    breaker = deps.breaker_for(provider.breaker_name, cfg.breaker)
    taken = _rate_limit(deps, rec, cfg, outcomes, breaker)
    if isinstance(taken, str):
        return taken
    return Ready(rec, tx, provider, message, breaker, *taken)


def _send(deps: PipelineDeps, batch: list[Ready], one_text: bool) -> list[str]:
    """One provider request for the batch (members of one `by_request` group, `one_text`: all
    with the same message); what happened to each member."""
    provider = batch[0].provider
    outcomes = Outcomes(deps)
    members = [ready.rec for ready in batch]
    out_id = batch_out_id([rec.id for rec in members]) if len(batch) > 1 else ""
    if not out_id:
        # Alone, it goes under its own id. A `sent_as` left from an earlier request stays on
        # the record until this send is recorded: a look-up after a timeout needs both.
        members = [replace(members[0], sent_as="")]
    else:
        members = [replace(rec, sent_as=out_id) for rec in members]
        # Written before the request: if this worker dies mid-send, whoever takes a member over
        # looks it up under the batch's OutId.
        pipe = deps.ledger.redis.pipeline()
        for rec in members:
            deps.ledger.update(rec.id, into=pipe, sent_as=out_id)
        pipe.execute()

    breaker = batch[0].breaker
    try:
        permit = batch[-1].permit or breaker.acquire()  # the freshest read of its state
    except CircuitOpen:
        # No request was made: its tokens go back, or the next provider's (or channel's) send
        # would cost the person a second message of their limit for this one.
        pipe = deps.ledger.redis.pipeline()
        for ready in batch:
            deps.buckets.give_back(_buckets(ready.rec, deps.settings.channels[ready.rec.channel]),
                                   ready.taken, into=pipe)
            deps.ledger.uncount_attempt(ready.rec.id, into=pipe)
        pipe.execute()
        return [outcomes.next_provider(rec, "circuit_open", provider.breaker_name) for rec in members]

    started_wall, started = time.time(), time.monotonic()
    try:
        receipt = deps.runner.run(_request(batch, members, out_id, one_text))
    except DeliveryError as exc:
        (breaker.record_failure if exc.trips_breaker else breaker.record_success)(permit)
        error = exc
    except Exception as exc:
        # A provider bug, or the task's soft time limit mid-request: nothing says whether the
        # request left, so retry (then fall back) but look it up first.
        breaker.record_failure(permit)
        error = MaybeSentError("unexpected", type(exc).__name__)
    else:
        latency = time.monotonic() - started

        def record() -> list[str]:
            # One round trip for the breaker's success and every member's record.
            pipe = deps.ledger.redis.pipeline()
            breaker.record_success(permit, into=pipe)
            results = [outcomes.sent(rec, provider.provider_name, receipt, latency=latency,
                                     accepted_at=ready.tx.created_at, into=pipe, execute=False)
                       for rec, ready in zip(members, batch, strict=True)]
            pipe.execute()
            return results

        # The provider has it: a record lost to a Redis blip would leave the delivery to be
        # taken over as maybe sent, and sent again where there is no look-up (email, push).
        return until_redis_answers(record, wait=RECORD_WAIT, what=f"recording {members[0].id}")
    elapsed = time.monotonic() - started
    if len(members) > 1 and error.recipient_scoped:
        # One bad or capped number refuses the whole request: send each half again (still
        # claimed, tokens already taken) until the numbers at fault are alone, so only their
        # recipients fall back. One bad number among n costs about 2·log2(n) more requests.
        outcomes.batch_refused(members, provider.provider_name, error, elapsed, started_wall)
        half = len(batch) // 2
        return _send(deps, batch[:half], one_text) + _send(deps, batch[half:], one_text)
    return [outcomes.failed_send(rec, provider.provider_name, error, elapsed, started_wall)
            for rec in members]


def _request(batch: list[Ready], members: list[DeliveryRecord], out_id: str, one_text: bool
             ) -> Coroutine[Any, Any, Receipt]:
    """The provider call for a batch: its one message, the same text to every member's number,
    or a text each (`send_each`)."""
    first = batch[0]
    if not out_id:
        return first.provider.send(first.message)
    if one_text:
        return first.provider.send(replace(first.message, delivery_id=out_id, aliases=(),
                                           address=",".join(rec.address for rec in members)))
    return first.provider.send_each([replace(r.message, aliases=()) for r in batch], out_id)


def _rate_limit(deps: PipelineDeps, rec: DeliveryRecord, cfg: ChannelConfig, outcomes: Outcomes,
                breaker: FleetBreaker) -> tuple[Permit | None, Decision] | str:
    """Take this send's tokens: (the breaker's permit if its state read says closed, the take)
    when taken, else what was done instead (deferred, held for a digest, fallen back)."""
    buckets = _buckets(rec, cfg)
    channel_bucket = buckets[0] if cfg.rate_limit else None
    # A newcomer (never waited on a timer) queues behind paced deliveries instead of taking a
    # token they are waiting for (checked by the take itself: no extra round trip).
    newcomer = channel_bucket is not None and rec.next_at is None
    pipe = deps.ledger.redis.pipeline(transaction=False)
    decide = deps.buckets.queue_take(
        pipe, buckets, behind=deps.pacer.key(channel_bucket) if channel_bucket and newcomer else None)
    peek = breaker.queue_peek(pipe)  # rides on the take's round trip instead of its own
    replies = pipe.execute()
    decision = decide(replies)
    if decision.allowed:
        return peek(replies), decision
    return _refused(deps, rec, cfg, outcomes, buckets=buckets, channel_bucket=channel_bucket,
                    decision=decision)


def _refused(deps: PipelineDeps, rec: DeliveryRecord, cfg: ChannelConfig, outcomes: Outcomes, *,
             buckets: list[Bucket], channel_bucket: Bucket | None, decision: Decision) -> str:
    """What a refused take leads to: deferred, held for a digest, or fallen back."""
    if decision.behind and channel_bucket is not None:
        return outcomes.deferred(rec, time.time() + deps.pacer.slot(channel_bucket, 0.0), "channel")
    scope = "recipient" if decision.limiting != rec.channel else "channel"
    if scope == "recipient" and decision.retry_after > cfg.max_defer:
        return outcomes.fall_back(rec, "recipient_budget", decision.limiting or "")
    if scope == "recipient" and rec.kind not in NEVER_MERGED:
        return hold(deps, rec, decision.retry_after)
    limiting = next(b for b in buckets if b.key == decision.limiting)
    return outcomes.deferred(rec, time.time() + deps.pacer.slot(limiting, decision.retry_after),
                             scope)


def _buckets(rec: DeliveryRecord, cfg: ChannelConfig) -> list[Bucket]:
    buckets = [Bucket(rec.channel, cfg.rate_limit)] if cfg.rate_limit else []
    buckets += [Bucket(f"{rec.channel}:{rec.address}:{i}", limit)
                for i, limit in enumerate(cfg.recipient_limits)]
    return buckets


def _digest_events(deps: PipelineDeps, rec: DeliveryRecord) -> tuple[Event, ...]:
    events: list[Event] = []
    seen: set[str] = set()
    for member in deps.ledger.deliveries_by_id(rec.digest_of):
        if member is None or member.transaction_id in seen:
            continue
        seen.add(member.transaction_id)
        member_tx = deps.ledger.transaction_or_unreadable(member.transaction_id)
        if isinstance(member_tx, TransactionRecord):  # an unreadable one: the digest goes without
            events.append(member_tx.event)
    return tuple(events)


def _message(deps: PipelineDeps, rec: DeliveryRecord, tx: TransactionRecord,
             cfg: ChannelConfig) -> Outgoing:
    recipient = deps.settings.recipients.get(rec.recipient)
    locale = (recipient.locale if recipient else None) or deps.settings.locale
    provider_cfg = cfg.providers[rec.provider_index]
    limits = deps.providers[rec.channel][rec.provider_index].limits
    aliyun = provider_cfg if isinstance(provider_cfg, AliyunSmsProvider) else None
    digest = _digest_events(deps, rec)
    kind = "digest" if digest else rec.kind
    rendered: Rendered = deps.renderer.render(
        rec.channel,
        TemplateContext(event=tx.event, transaction_id=tx.id, recipient=rec.recipient,
                        locale=locale, digest=digest,
                        sms_template=aliyun.template_kind(kind) if aliyun else ""),
        param_max_chars=aliyun.param_max_chars if aliyun else 35,
        body_maxlen=limits.body_maxlen,
        title_maxlen=limits.title_maxlen,
    )
    data = {"transaction_id": tx.id, "delivery_id": rec.id, "kind": rec.kind}
    if "sms_up_extend_code" in tx.event.extra:
        data["sms_up_extend_code"] = tx.event.extra["sms_up_extend_code"]
    return Outgoing(delivery_id=rec.id, transaction_id=tx.id, address=rec.address, kind=rec.kind,
                    rendered=rendered, data=data, aliases=(rec.sent_as,) if rec.sent_as else ())
