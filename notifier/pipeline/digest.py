"""Storm protection: what a recipient's limit holds back goes out as one digest message.

A delivery refused by the recipient's bucket is parked in a set per (channel, address, fallback
chain) and a single timer is set for when the bucket refills. When it fires, everything parked
is merged into one `digest` delivery, in one script with the merge itself: each merged delivery
points at it (`digest_id`), can no longer be claimed by a task of its own (the claim answers
`merged`), and is settled when the digest is: suppressed (reached) if it went out, failed if it
did not. A digest that fails goes on along its members' fallback chain as a digest.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from notifier.ids import ulid
from notifier.ledger import PREFIX, Attempt, DeliveryRecord
from notifier.models import DeliveryStatus
from notifier.pipeline.deps import PipelineDeps
from notifier.tasks_spec import DELIVER, DIGEST, deliver_queue

# Kinds a recipient's limit defers (paced, or down the fallback chain past max_defer) instead
# of holding for a digest: a digest is the merge itself, and a drill message carries the reply
# code (and reply extension) the operator confirms with, which a digest's summary drops.
NEVER_MERGED = frozenset({"digest", "drill"})
# A merge that keeps losing to tasks claiming its members gives up for a moment (its timer).
_MERGE_TRIES = 3
_MERGE_RETRY_AFTER = 1.0


@dataclass(frozen=True)
class Held:
    """What one held set collects: one address on one channel, for one fallback chain.

    Why per chain: a digest fails and falls back as one delivery, along one chain. Merging
    deliveries whose routes fall back differently would give a critical alert (fallback: email)
    the fate of a warning without a fallback. A phone gets at most one digest per distinct
    chain per window instead of one, each still paced by the recipient's limit."""

    channel: str
    address: str
    chain: tuple[str, ...]

    @classmethod
    def of(cls, rec: DeliveryRecord) -> Held:
        return cls(rec.channel, rec.address, tuple(rec.fallback_chain))

    @classmethod
    def parse(cls, target: str) -> Held:
        """From a DIGEST timer's argument, `channel>chain|address` (`channel|address` without
        a chain: what every set was before chains were kept apart)."""
        head, _, address = target.partition("|")
        channel, _, chain = head.partition(">")
        return cls(channel, address, tuple(chain.split(",")) if chain else ())

    @property
    def _head(self) -> str:
        return f"{self.channel}>{','.join(self.chain)}" if self.chain else self.channel

    @property
    def target(self) -> str:
        return f"{self._head}|{self.address}"

    @property
    def key(self) -> str:
        return f"{PREFIX}held:{self._head}:{self.address}"


def hold(deps: PipelineDeps, rec: DeliveryRecord, retry_after: float) -> str:
    """Park a delivery until the recipient's bucket allows one more message."""
    due = time.time() + retry_after
    held = Held.of(rec)
    pipe = deps.ledger.redis.pipeline()
    pipe.zadd(held.key, {rec.id: time.time()})
    pipe.expire(held.key, deps.ledger.retention)
    pipe.execute()
    deps.ledger.uncount_attempt(rec.id)
    deps.ledger.update(rec.id, status=DeliveryStatus.DEFERRED.value, next_at=due,
                       reason="held by the recipient's rate limit for a digest")
    deps.ledger.record_attempt(rec.id, Attempt(at=time.time(), provider="", outcome="deferred",
                                               message="recipient limit: held for digest",
                                               retry_at=due))
    deps.timers.schedule(DIGEST, deliver_queue(rec.channel), held.target, due, keep_existing=True)
    deps.metrics.inc("notifier_deferrals", channel=rec.channel, scope="recipient")
    return "held"


def flush(deps: PipelineDeps, target: str) -> str:
    """The digest timer fired: merge everything held for `target` into one message."""
    held = Held.parse(target)
    for _ in range(_MERGE_TRIES):
        members = _still_held(deps, held)
        if not members:
            return "empty"
        if len(members) == 1:  # nothing to merge: it simply goes now
            _release(deps, held, members)
            return "released"
        first = members[0]
        digest = DeliveryRecord(
            id=f"{first.transaction_id}.dg-{ulid()}", transaction_id=first.transaction_id,
            channel=held.channel, recipient=first.recipient, address=held.address, kind="digest",
            fallback_chain=list(held.chain), digest_of=[m.id for m in members],
        )
        if deps.ledger.merge_into_digest(held.key, digest):
            _merged(deps, digest, members)
            return f"digest of {len(members)}"
    deps.timers.schedule(DIGEST, deliver_queue(held.channel), target,
                         time.time() + _MERGE_RETRY_AFTER, keep_existing=True)
    return "contended"


def _still_held(deps: PipelineDeps, held: Held) -> list[DeliveryRecord]:
    """What the held set names that still waits for a digest. Those that ended meanwhile (sent
    alone by an earlier task, failed) leave the set; those in flight stay: they may be held
    again. One of another chain (parked by a version that kept chains together) goes on alone,
    to be held again in its own chain's set."""
    ids = [m.decode() for m in deps.ledger.redis.zrange(held.key, 0, -1)]
    records = dict(zip(ids, deps.ledger.deliveries_by_id(ids), strict=True))
    ended = [did for did, r in records.items() if r is None or DeliveryStatus(r.status).terminal]
    waiting = [r for r in records.values()
               if r is not None and r.status == DeliveryStatus.DEFERRED and not r.digest_id]
    _release(deps, held, [r for r in waiting if Held.of(r) != held], also_off=ended)
    return [r for r in waiting if Held.of(r) == held]


def _release(deps: PipelineDeps, held: Held, records: list[DeliveryRecord],
             also_off: Sequence[str] = ()) -> None:
    """Let held deliveries go on their own: off the set, a deliver task each; `also_off`: ids
    to take off the set in the same write (ended meanwhile)."""
    off = [*also_off, *(r.id for r in records)]
    if not off:
        return
    deps.ledger.redis.zrem(held.key, *off)
    for rec in records:
        deps.publisher.publish(DELIVER, [rec.id], deliver_queue(rec.channel))


def _merged(deps: PipelineDeps, digest: DeliveryRecord, members: list[DeliveryRecord]) -> None:
    pipe = deps.ledger.redis.pipeline()
    for member in members:
        deps.ledger.log(member.transaction_id, "merged_into_digest", into=pipe, delivery=member.id,
                        digest=digest.id)
    deps.metrics.inc("notifier_digests", into=pipe, channel=digest.channel)
    pipe.execute()
    deps.publisher.publish(DELIVER, [digest.id], deliver_queue(digest.channel))
