"""Storm protection: what a recipient's limit holds back goes out as one digest message.

A delivery refused by the recipient's bucket is parked in a per-(channel, address) set and a
single timer is set for when the bucket refills. When it fires, everything parked is merged
into one `digest` delivery, in one script with the merge itself: each merged delivery points at
it (`digest_id`), can no longer be claimed by a task of its own (the claim answers `merged`),
and is settled when the digest is: suppressed (reached) if it went out, failed if it did not.
"""

from __future__ import annotations

import time

from notifier.ids import ulid
from notifier.ledger import PREFIX, Attempt, DeliveryRecord
from notifier.models import DeliveryStatus
from notifier.pipeline.deps import PipelineDeps
from notifier.tasks_spec import DELIVER, DIGEST, deliver_queue

# A merge that keeps losing to tasks claiming its members gives up for a moment (its timer).
_MERGE_TRIES = 3
_MERGE_RETRY_AFTER = 1.0


def held_key(channel: str, address: str) -> str:
    return f"{PREFIX}held:{channel}:{address}"


def hold(deps: PipelineDeps, rec: DeliveryRecord, retry_after: float) -> str:
    """Park a delivery until the recipient's bucket allows one more message."""
    due = time.time() + retry_after
    key = held_key(rec.channel, rec.address)
    pipe = deps.ledger.redis.pipeline()
    pipe.zadd(key, {rec.id: time.time()})
    pipe.expire(key, deps.ledger.retention)
    pipe.execute()
    deps.ledger.uncount_attempt(rec.id)
    deps.ledger.update(rec.id, status=DeliveryStatus.DEFERRED.value, next_at=due,
                       reason="held by the recipient's rate limit for a digest")
    deps.ledger.record_attempt(rec.id, Attempt(at=time.time(), provider="", outcome="deferred",
                                               message="recipient limit: held for digest",
                                               retry_at=due))
    deps.timers.schedule(DIGEST, deliver_queue(rec.channel), f"{rec.channel}|{rec.address}", due,
                         keep_existing=True)
    deps.metrics.inc("notifier_deferrals", channel=rec.channel, scope="recipient")
    return "held"


def flush(deps: PipelineDeps, target: str) -> str:
    """The digest timer fired: merge everything held for `channel|address` into one message."""
    channel, _, address = target.partition("|")
    key = held_key(channel, address)
    for _ in range(_MERGE_TRIES):
        members = _still_held(deps, key)
        if not members:
            return "empty"
        if len(members) == 1:  # nothing to merge: it simply goes now
            deps.ledger.redis.zrem(key, members[0].id)
            deps.publisher.publish(DELIVER, [members[0].id], deliver_queue(channel))
            return "released"
        first = members[0]
        digest = DeliveryRecord(
            id=f"{first.transaction_id}.dg-{ulid()}", transaction_id=first.transaction_id,
            channel=channel, recipient=first.recipient, address=address, kind="digest",
            fallback_chain=list(first.fallback_chain), digest_of=[m.id for m in members],
        )
        if deps.ledger.merge_into_digest(key, digest):
            _merged(deps, digest, members)
            return f"digest of {len(members)}"
    deps.timers.schedule(DIGEST, deliver_queue(channel), target, time.time() + _MERGE_RETRY_AFTER,
                         keep_existing=True)
    return "contended"


def _still_held(deps: PipelineDeps, key: str) -> list[DeliveryRecord]:
    """What the held set names that still waits for a digest. Those that ended meanwhile (sent
    alone by an earlier task, failed) leave the set; those in flight stay: they may be held again."""
    held = [m.decode() for m in deps.ledger.redis.zrange(key, 0, -1)]
    records = {did: deps.ledger.delivery(did) for did in held}
    ended = [did for did, r in records.items() if r is None or DeliveryStatus(r.status).terminal]
    if ended:
        deps.ledger.redis.zrem(key, *ended)
    return [r for r in records.values()
            if r is not None and r.status == DeliveryStatus.DEFERRED and not r.digest_id]


def _merged(deps: PipelineDeps, digest: DeliveryRecord, members: list[DeliveryRecord]) -> None:
    pipe = deps.ledger.redis.pipeline()
    for member in members:
        deps.ledger.log(member.transaction_id, "merged_into_digest", into=pipe, delivery=member.id,
                        digest=digest.id)
    deps.metrics.inc("notifier_digests", into=pipe, channel=digest.channel)
    pipe.execute()
    deps.publisher.publish(DELIVER, [digest.id], deliver_queue(digest.channel))

