"""Operator replies (Aliyun SmsUp): validate, store first, then confirm or reject each one.

A reply is judged at the instant it arrived (stored), not when a worker gets to it: workers
may be busy or restarting, and what the operator did must not depend on that. It confirms only
when, at that instant, its code was unexpired and its phase live, and the code was issued to
the number it came from; the confirmation time is that instant too. Every
other reply is recorded as rejected with its reason: on the drill its code belongs to, or, for
replies that name no known code, on every unfinished drill the sender is an operator of (and in
a fleet-wide list, for replies from strangers). A re-pushed reply is stored once.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, replace
from typing import Annotated, Any

import redis
from pydantic import BaseModel, ConfigDict, Field

from notifier.config import e164_or_raw, mask_phone
from notifier.drills.codes import Reason, Verdict, match_reply
from notifier.drills.model import DrillConflict
from notifier.drills.service import DrillService
from notifier.inbox import Checked, Inbox, check_records
from notifier.metrics import Metrics

log = logging.getLogger(__name__)
INBOX = "up"
REJECTED = "ntf:replies:rejected"  # fleet-wide, newest last, capped
REJECTED_KEEP = 1000


class SmsUpIn(BaseModel):
    """One record of an Aliyun SmsUp push; unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore")
    # As pushed: a sender that is no phone number (a short code, a garbled number) is still a
    # reply, stored and rejected as bad_number where the drill's operators can see it.
    phone_number: str = Field(min_length=1, max_length=32)
    content: str = Field(max_length=2000)
    send_time: str = Field(default="", max_length=32)
    # A bound makes pydantic check the text (a `str` in a union passes unchecked, so a lone
    # surrogate got as far as storing the push, which failed: 500, and the push was lost).
    dest_code: Annotated[str, Field(max_length=64)] | int = ""
    sequence_id: Annotated[str, Field(max_length=64)] | int = ""


@dataclass(frozen=True)
class Reply:
    phone: str  # E.164, or as pushed when it is not a phone number
    content: str
    send_time: str = ""
    dest_code: str = ""
    sequence_id: str = ""

    @property
    def member(self) -> str:
        """Dedup key: Aliyun's sequence_id, else what was sent when."""
        if self.sequence_id:
            return f"{self.phone}|{self.sequence_id}"
        digest = hashlib.sha256(f"{self.send_time}|{self.content}".encode()).hexdigest()[:24]
        return f"{self.phone}|{digest}"


def parse_replies(payload: Any) -> Checked[Reply]:
    """An SmsUp body -> its replies and its invalid records; `InvalidPush` if not an array."""
    checked = check_records(payload, "SmsUp", SmsUpIn)
    # A sender that is no phone number is kept, to be rejected as bad_number.
    replies = [Reply(phone=e164_or_raw(rec.phone_number), content=rec.content,
                     send_time=rec.send_time, dest_code=str(rec.dest_code),
                     sequence_id=str(rec.sequence_id)) for rec in checked.records]
    return Checked(replies, checked.invalid)


def reply_inbox(client: redis.Redis, retention: float) -> Inbox:
    return Inbox(client, INBOX, retention)


def store_replies(inbox: Inbox, replies: list[Reply]) -> tuple[int, int]:
    fresh = inbox.store([(r.member, asdict(r)) for r in replies])
    return sum(fresh), len(fresh) - sum(fresh)


def apply_due(svc: DrillService, limit: int = 200) -> dict[str, int]:
    inbox = reply_inbox(svc.redis, svc.settings.retention)
    counts: dict[str, int] = {}
    for item in inbox.claim(limit):
        try:
            reply = Reply(**{k: v for k, v in item.record.items() if k != "received_at"})
            received_at = float(item.record["received_at"])
        except (TypeError, KeyError, ValueError):  # stored by another version: it would fail on every claim
            log.error("a stored reply has an unknown shape (fields: %s); dropped",
                      ", ".join(sorted(item.record)))
            result = "invalid"
        else:
            result = apply_reply(svc, reply, received_at)
        inbox.done(item.member)
        Metrics(svc.redis).inc("notifier_replies", result=result)
        counts[result] = counts.get(result, 0) + 1
    return counts


def apply_reply(svc: DrillService, reply: Reply, received_at: float) -> str:
    """Confirm or reject one reply as of when it arrived; returns the reason (confirmed,
    already_confirmed, ...)."""

    def was_live(drill_id: str, phase: int) -> bool:
        return svc.was_live(drill_id, phase, received_at)

    verdict = match_reply(reply.phone, reply.content, received_at, svc.codes.lookup, was_live)
    record = verdict.record
    if verdict.confirmed and record is not None:
        drill = svc.store.drill(record.drill)
        if drill is not None:
            try:
                done = svc.record_confirmation(drill, record.phase, record.operator, "sms",
                                               mask_phone(reply.phone), at=received_at)
            except DrillConflict:  # its phase ended (by another host's clock) before it came
                verdict = replace(verdict, reason=Reason.NOT_LIVE)
            else:
                if done.first:
                    return "confirmed"
                svc.store.log(drill, "reply_repeated", at=received_at, phase=record.phase,
                              operator=record.operator, sender=mask_phone(reply.phone))
                return "already_confirmed"
    _reject(svc, reply, verdict, received_at)
    return verdict.reason.value


def _reject(svc: DrillService, reply: Reply, verdict: Verdict, received_at: float) -> None:
    detail = {"sender": mask_phone(reply.phone), "reason": verdict.reason.value}
    if verdict.record is not None:
        # A real code (another operator's, expired, of another phase): name whose it was, but
        # keep the code itself off reports, which more people read than hold the phones.
        detail["code_of"] = verdict.record.operator
    elif verdict.code:
        detail["code"] = verdict.code  # issued to nobody: shows the typo
    else:
        detail["text"] = reply.content[:80]  # no code in it: what did they send?
    targets = [verdict.record.drill] if verdict.record is not None else _drills_of(svc, verdict)
    for drill_id in targets:
        drill = svc.store.drill(drill_id)
        if drill is not None:
            # A code names its phase; a reply without a known code counts against the one live
            # when it arrived (the lead may have started the next since).
            phase = verdict.record.phase if verdict.record is not None else next(
                (i for i in range(len(drill.phases)) if svc.was_live(drill.id, i, received_at)),
                None)
            svc.store.log(drill, "reply_rejected", at=received_at, phase=phase, **detail)
    entry = json.dumps({"at": received_at, **detail, "drills": targets}, ensure_ascii=False)
    pipe = svc.redis.pipeline()
    pipe.rpush(REJECTED, entry)
    pipe.ltrim(REJECTED, -REJECTED_KEEP, -1)
    pipe.execute()


def _drills_of(svc: DrillService, verdict: Verdict) -> list[str]:
    """Unfinished drills the sender is an operator of: where a wrong code should show up."""
    if not verdict.phone:
        return []
    names = {name for name, r in svc.settings.recipients.items() if r.phone == verdict.phone}
    found = []
    for drill_id in svc.store.active():
        drill = svc.store.drill(drill_id)
        if drill is not None and names & set(drill.operators):
            found.append(drill_id)
    return found
