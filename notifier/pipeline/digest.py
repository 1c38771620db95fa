"""Storm protection: what a recipient's limit holds back goes out as one digest message.

A delivery refused by the recipient's bucket is parked in a per-(channel, address) set and a
single timer is set for when the bucket refills. When it fires, everything parked is merged
into one `digest` delivery; each merged delivery points at it (`digest_id`) and is settled
when the digest is: suppressed (reached) if it went out, failed if it did not.
"""

from __future__ import annotations

import time

from notifier.ids import ulid
from notifier.ledger import PREFIX, Attempt, DeliveryRecord
from notifier.models import DeliveryStatus
from notifier.pipeline.deps import PipelineDeps
from notifier.tasks_spec import DELIVER, DIGEST, deliver_queue

_TAKE_ALL = """
local members = redis.call('ZRANGE', KEYS[1], 0, -1)
redis.call('DEL', KEYS[1])
return members
"""


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
    script = deps.ledger.redis.register_script(_TAKE_ALL)
    held = [m.decode() for m in script(keys=[held_key(channel, address)])]
    members = [r for r in (deps.ledger.delivery(d) for d in held)
               if r is not None and r.status == DeliveryStatus.DEFERRED]
    if not members:
        return "empty"
    if len(members) == 1:  # nothing to merge: it simply goes now
        deps.publisher.publish(DELIVER, [members[0].id], deliver_queue(channel))
        return "released"
    first = members[0]
    digest = DeliveryRecord(
        id=f"{first.transaction_id}.dg-{ulid()}", transaction_id=first.transaction_id,
        channel=channel, recipient=first.recipient, address=address, kind="digest",
        fallback_chain=list(first.fallback_chain), digest_of=[m.id for m in members],
    )
    deps.ledger.add_deliveries([digest])
    for member in members:
        deps.ledger.update(member.id, digest_id=digest.id,
                           reason=f"merged into digest {digest.id}")
        deps.ledger.log(member.transaction_id, "merged_into_digest", delivery=member.id,
                        digest=digest.id)
    deps.metrics.inc("notifier_digests", channel=channel)
    deps.publisher.publish(DELIVER, [digest.id], deliver_queue(channel))
    return f"digest of {len(members)}"


def settle_members(deps: PipelineDeps, digest: DeliveryRecord, reached: bool) -> list[str]:
    """The digest reached a final state: settle what it carried. Returns their transactions."""
    status = DeliveryStatus.SUPPRESSED if reached else DeliveryStatus.FAILED
    txids: list[str] = []
    for did in digest.digest_of:
        deps.ledger.update(did, status=status.value, next_at=None)
        member = deps.ledger.delivery(did)
        if member is not None and member.transaction_id not in txids:
            txids.append(member.transaction_id)
    return txids
