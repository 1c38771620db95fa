"""The ledger: transactions, deliveries and attempts in Redis, and the dedup/idempotency keys.

Every key expires after the retention period. Writes that decide something (accepting a
transaction, claiming a delivery) are single Lua scripts so two API or worker processes can
never both win.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import redis
from redis.client import Pipeline

from notifier import ledger_scripts as scripts
from notifier.ids import fallback_id
from notifier.ledger_accept import ScriptCall, accept_results
from notifier.ledger_counts import DELIVERY_COUNTERS, SET_IF_STATUS, delivery_series
from notifier.ledger_keys import DEADLETTERS, OPEN, OUTBOX, PREFIX, delivery_key, tx_key
from notifier.ledger_rows import (
    Claim,
    Unreadable,
    deliveries_from,
    delivery_from,
    entry,
    pairs,
    rolled_up,
    transaction_from,
    transaction_or_unreadable,
)
from notifier.metrics import metric_field, metric_key
from notifier.models import DeliveryStatus, TxStatus
from notifier.records import (
    AcceptOutcome,
    AcceptResult,
    Attempt,
    ClaimResult,
    DeliveryRecord,
    TransactionRecord,
    text,
)
from notifier.redis_conn import queue_script

__all__ = ["DEADLETTERS", "OPEN", "OUTBOX", "PREFIX", "AcceptOutcome", "AcceptResult", "Attempt", "Claim",
           "ClaimResult", "DeliveryRecord", "FanOut", "Ledger", "TransactionRecord", "delivery_key", "text",
           "tx_key"]

_FINAL = ("sent", "delivered", "failed", "fallen_back", "suppressed")
# What the roll-up script needs of the delivery statuses, from their one definition.
_TERMINAL = ",".join(s.value for s in DeliveryStatus if s.terminal)
_REACHED = ",".join(s.value for s in DeliveryStatus if s.succeeded or s is DeliveryStatus.SUPPRESSED)
# A delivery in these no longer carries its message: a fallback to its channel creates another.
_NOT_LIVE = ",".join((DeliveryStatus.FAILED.value, DeliveryStatus.FALLEN_BACK.value))
_VERDICTS = (TxStatus.DELIVERED, TxStatus.PARTIAL, TxStatus.FAILED)  # write_status's order


def _verdict_keys(txid: str) -> list[str]:
    """The keys of the scripts' status write (write_status in ledger_scripts)."""
    return [tx_key(txid), f"{tx_key(txid)}:log", DEADLETTERS, OPEN,
            metric_key("notifier_transactions_finished"),
            metric_key("notifier_transactions_revised")]


def _verdicts(now: float) -> list[str]:
    """For each verdict (delivered, partial, failed): its history entry and counter series."""
    out: list[str] = []
    for status in _VERDICTS:
        out += [entry(now, f"status {status.value}", {}),
                metric_field("notifier_transactions_finished", status=status.value)]
    return out


@dataclass(frozen=True)
class FanOut:
    """One transaction's dispatch write (`Ledger.fan_out`); `detail` goes on its history line."""
    transaction_id: str
    records: Sequence[DeliveryRecord]
    detail: Mapping[str, str]


class Ledger:
    def __init__(self, client: redis.Redis, retention: float = 7 * 86400.0) -> None:
        self.redis = client
        self.retention = int(retention)
        self._accept = client.register_script(scripts.ACCEPT)
        self._replay = client.register_script(scripts.REPLAY)
        self._claim = client.register_script(scripts.CLAIM)
        self._add = client.register_script(scripts.ADD_DELIVERIES)
        self._fall_back = client.register_script(scripts.FALL_BACK)
        self._rescore_open = client.register_script(scripts.MOVE_IF_UNCHANGED)
        self._deliveries_of = client.register_script(scripts.DELIVERIES_OF)
        self._roll_up = client.register_script(scripts.ROLL_UP)
        self._finish = client.register_script(scripts.FINISH)
        self.set_if_status = client.register_script(SET_IF_STATUS)  # a receipt's write
        self._merge = client.register_script(scripts.MERGE)
        self._settle_merged = client.register_script(scripts.SETTLE_MERGED)

    # -- transactions ---------------------------------------------------------------------

    def accept(self, call: ScriptCall) -> list[AcceptResult]:
        """Store events and queue their dispatch task (see notifier.ledger_accept)."""
        return accept_results(self._accept(keys=call.keys, args=call.args))

    def accept_replay(self, call: ScriptCall, dead_letter: str) -> AcceptResult | None:
        """Accept one event as the replay of the dead letter `dead_letter` and take that off its
        list, in one script (see REPLAY); None when it is not a dead letter (any more)."""
        reply = self._replay(keys=call.keys, args=[*call.args, dead_letter])
        return accept_results(reply)[0] if reply else None

    def transaction(self, txid: str) -> TransactionRecord | None:
        return transaction_from(self.redis.hgetall(tx_key(txid)))

    def transaction_or_unreadable(self, txid: str) -> TransactionRecord | Unreadable | None:
        """The transaction, or what is legible of it when it cannot be read (see ledger_rows)."""
        return transaction_or_unreadable(self.redis.hgetall(tx_key(txid)))

    def transactions_and_deliveries(
            self, txids: Sequence[str],
    ) -> list[tuple[TransactionRecord | Unreadable | None, list[DeliveryRecord]]]:
        """Each transaction with its deliveries, all in one round trip (what the transactions of
        one dispatch message start from); one that cannot be read comes back as Unreadable, so
        that it does not hold back the others."""
        pipe = self.redis.pipeline(transaction=False)
        for txid in txids:
            pipe.hgetall(tx_key(txid))
            queue_script(pipe, scripts.DELIVERIES_OF, [f"{tx_key(txid)}:dl"], [])
        replies = pipe.execute()
        return [(transaction_or_unreadable(replies[i]), deliveries_from(replies[i + 1]))
                for i in range(0, len(replies), 2)]

    def finish(self, txid: str, status: TxStatus, close: Sequence[str] = ()) -> bool:
        """Set a transaction's status; True only for the call that gives it a new verdict, which
        also writes its history line, the finished counter and its dead letter (see FINISH).
        One script with taking the rolled-up deliveries `close` off the open index."""
        now = time.time()
        args = [txid, status.value, repr(now), self.retention, *_verdicts(now), *close]
        return bool(self._finish(keys=_verdict_keys(txid), args=args))

    def roll_up(self, txid: str, close: Sequence[str] = (), *, into: Pipeline | None = None
                ) -> tuple[TxStatus, bool] | None:
        """Decide `txid`'s status from its deliveries and write it as `finish` does, in one
        script (see ROLL_UP). Returns (status, whether this call gave it a new verdict), or
        None when queued on `into` (the reply is then that pipeline's last)."""
        now = time.time()
        keys = [*_verdict_keys(txid), f"{tx_key(txid)}:dl"]
        args: list[str | int] = [txid, repr(now), self.retention, _TERMINAL, _REACHED,
                                 DeliveryStatus.FALLEN_BACK.value, *_verdicts(now), *close]
        if into is not None:
            queue_script(into, scripts.ROLL_UP, keys, args)
            return None
        return rolled_up(self._roll_up(keys=keys, args=args))

    def log(self, txid: str, what: str, *, into: Pipeline | None = None, **detail: str) -> None:
        key = f"{tx_key(txid)}:log"
        pipe = into if into is not None else self.redis.pipeline()
        pipe.rpush(key, entry(time.time(), what, detail))
        pipe.ltrim(key, -500, -1)
        pipe.expire(key, self.retention)
        if into is None:
            pipe.execute()

    def history(self, txid: str) -> list[dict[str, Any]]:
        """The transaction's history, first its acceptance (from the transaction itself: the
        accept script writes no line for it), then the lines written since."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hmget(tx_key(txid), ["created_at", "source"])
        pipe.lrange(f"{tx_key(txid)}:log", 0, -1)
        (created_at, source), lines = pipe.execute()
        history = [json.loads(x) for x in lines]
        if created_at is not None and not (history and history[0]["event"] == "accepted"):
            # (a transaction accepted by an earlier version has its line already)
            history.insert(0, {"at": float(created_at), "event": "accepted", "source": text(source)})
        return history

    def outbox_older_than(self, age: float, limit: int = 500) -> list[str]:
        cutoff = time.time() - age
        return [text(x) for x in self.redis.zrangebyscore(OUTBOX, "-inf", cutoff, 0, limit)]

    def outbox_expect(self, txid: str, within: float) -> None:
        """Its dispatch task is on the broker: sweep it only if not fanned out `within` s."""
        self.redis.zadd(OUTBOX, {txid: time.time() + within - 5.0}, xx=True)

    def fanned_out(self, *txids: str) -> None:
        if txids:
            self.redis.zrem(OUTBOX, *txids)

    def dead_letters(self, limit: int = 100) -> list[tuple[str, float]]:
        rows: list[Any] = self.redis.zrevrange(DEADLETTERS, 0, limit - 1, withscores=True)
        return [(text(member), float(score)) for member, score in rows]

    def drop_dead_letter(self, txid: str) -> bool:
        """An operator's "seen, not to be sent again" (the incident is over): off the list,
        with a history line while the transaction is still kept. False if it was not listed."""
        if not self.redis.zrem(DEADLETTERS, txid):
            return False
        self.log(txid, "dead_letter_dropped")
        return True

    def trim_dead_letters(self, now: float | None = None) -> int:
        """Take off the list what failed longer than `retention` ago: its transaction has
        expired (it is kept `retention` from its creation), so there is nothing left to replay,
        and a listed entry would keep NotifierDeadLetters firing for ever."""
        cutoff = (time.time() if now is None else now) - self.retention
        return int(self.redis.zremrangebyscore(DEADLETTERS, "-inf", f"({cutoff!r}"))

    # -- deliveries -----------------------------------------------------------------------

    def add_deliveries(self, records: Sequence[DeliveryRecord]) -> list[str]:
        """Create deliveries that do not exist yet (a redelivered dispatch adds nothing twice)."""
        if not records:
            return []
        keys, args = self._delivery_args(records)
        # All or nothing per delivery: a worker killed half-way must not leave a delivery that
        # exists but is on no list (a re-run dispatch would skip it and lose the message).
        created = self._add(keys=[OPEN, *keys], args=[self.retention, *args])
        return [text(x) for x in created]

    def add_fallback(self, failed: DeliveryRecord, channel: str | None,
                     successors: Sequence[DeliveryRecord]) -> tuple[tuple[str, str] | None, list[str]]:
        """Carry `failed` on: create its `successors` on the fallback `channel` (None: none is
        left) unless a live delivery of its transaction to the same recipient already carries
        the message, on `channel` or on the failed one's own channel to another address; then
        `failed` is marked carried, in the same step (see FALL_BACK). Returns ((the carrying
        delivery's id, its channel), []) or (None, the ids created)."""
        keys, args = self._delivery_args(successors)
        txid = failed.transaction_id
        reply = self._fall_back(
            keys=[OPEN, f"{tx_key(txid)}:dl", delivery_key(failed.id), *keys],
            args=[self.retention, args[0], failed.recipient, channel or "", _NOT_LIVE, failed.id,
                  failed.channel, json.dumps(failed.digest_of), *args[1:]])
        carrier, *rest = (text(x) for x in reply)
        if carrier:
            return (carrier, rest[0]), []
        return None, rest

    def fallback_started(self, did: str) -> bool:
        """Whether FALL_BACK ran for `did`: it created its first successor (ids.fallback_id:
        step 0) or marked it carried by another delivery. One round trip."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.exists(delivery_key(fallback_id(did, 0)))
        pipe.hexists(delivery_key(did), "carried_by")
        return any(pipe.execute())

    def fan_out(self, writes: Sequence[FanOut]) -> list[list[str]]:
        """Dispatches' writes, one round trip for all (each all or nothing, see FAN_OUT): status
        `dispatching`, the deliveries that do not exist yet, the `dispatched` history line,
        off the outbox. Returns the ids each write created."""
        if not writes:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for write in writes:
            keys, args = self._delivery_args(write.records)
            txid = write.transaction_id
            line = entry(float(args[0]), "dispatched", dict(write.detail))
            queue_script(pipe, scripts.FAN_OUT,
                         [OPEN, tx_key(txid), f"{tx_key(txid)}:log", OUTBOX, *keys],
                         [self.retention, args[0], txid, TxStatus.DISPATCHING.value, line, *args[1:]])
        return [[text(x) for x in created] for created in pipe.execute()]

    @staticmethod
    def _delivery_args(records: Sequence[DeliveryRecord]) -> tuple[list[str], list[str]]:
        """KEYS and ARGV pairs of the add scripts; ARGV starts with the creation time."""
        now = time.time()
        keys: list[str] = []
        args: list[str] = [repr(now)]
        for record in records:
            record.created_at = record.updated_at = now
            keys += [delivery_key(record.id), f"{tx_key(record.transaction_id)}:dl"]
            args += [record.id, json.dumps(record.to_redis(), ensure_ascii=False)]
        return keys, args

    def delivery(self, did: str) -> DeliveryRecord | None:
        return delivery_from(self.redis.hgetall(delivery_key(did)))

    def deliveries(self, txid: str) -> list[DeliveryRecord]:
        return deliveries_from(self._deliveries_of(keys=[f"{tx_key(txid)}:dl"]))

    def deliveries_by_id(self, dids: Sequence[str]) -> list[DeliveryRecord | None]:
        """Each delivery named (None for one that is gone), in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for did in dids:
            pipe.hgetall(delivery_key(did))
        return [delivery_from(raw) for raw in pipe.execute()]

    def open_due(self, cutoff: float, limit: int = 500) -> list[tuple[str, float]]:
        """The oldest open deliveries scored at or before `cutoff`, with their scores."""
        rows: list[Any] = self.redis.zrangebyscore(OPEN, "-inf", cutoff, 0, limit, withscores=True)
        return [(text(did), float(score)) for did, score in rows]

    def rescore_open(self, moves: Sequence[tuple[str, float, float]]) -> None:
        """(id, score as read, new score): each moved unless its score changed since the read."""
        if moves:
            self._rescore_open(keys=[OPEN], args=[repr(x) if isinstance(x, float) else x
                                                  for move in moves for x in move])

    def close_open(self, *dids: str) -> None:
        """Final and rolled up: the reaper need not look at these again."""
        if dids:
            self.redis.zrem(OPEN, *dids)

    def touch_open(self, did: str) -> None:
        self.redis.zadd(OPEN, {did: time.time()}, xx=True)

    def claim(self, did: str, token: str, lease: float, *, with_transaction: bool = True) -> Claim:
        """Claim a delivery for one send; the answer carries the delivery as claimed (and its
        transaction, unless the caller has it already), so nothing needs reading again."""
        reply = self._claim(keys=[delivery_key(did)],
                            args=[token, repr(time.time()), lease, int(with_transaction)])
        result = ClaimResult(text(reply[0]))
        if len(reply) < 3:
            return Claim(result)
        return Claim(result, delivery_from(pairs(reply[1])), transaction_or_unreadable(pairs(reply[2])))

    def merge_into_digest(self, held: str, digest: DeliveryRecord) -> bool:
        """Create `digest` and merge its `digest_of` into it, taking them off the `held` set;
        False (nothing written) when one of them is no longer held: see MERGE."""
        keys, args = self._delivery_args([digest])
        members = digest.digest_of
        return bool(self._merge(keys=[OPEN, *keys, held, *(delivery_key(d) for d in members)],
                                args=[self.retention, *args, *members]))

    def settle_merged(self, dids: Sequence[str], status: DeliveryStatus) -> list[str]:
        """Give `status` to those of `dids` still merged into a digest (see SETTLE_MERGED);
        the transactions of all of them, to roll up."""
        if not dids:
            return []
        keys = [delivery_key(d) for d in dids]
        pipe = self.redis.pipeline(transaction=False)
        for key in keys:
            pipe.hmget(key, ["channel", "provider"])
        # Merged members wait for their digest: no one else writes their channel or provider.
        series = [delivery_series(text(channel or b""), text(provider or b""), status.value)
                  for channel, provider in pipe.execute()]
        txids = self._settle_merged(keys=[*DELIVERY_COUNTERS, *keys],
                                    args=[status.value, repr(time.time()), *series])
        return [t for t in dict.fromkeys(text(x) for x in txids) if t]

    def update(self, did: str, *, into: Pipeline | None = None,
               **changes: str | float | int | list[str] | None) -> None:
        """Change delivery fields (None deletes one); `into` queues the writes on a pipeline."""
        mapping: dict[Any, Any] = {"updated_at": repr(time.time())}
        removed: list[str] = []
        for key, value in changes.items():
            if value is None:
                removed.append(key)
            elif isinstance(value, list):
                mapping[key] = json.dumps(value)
            else:
                mapping[key] = value if isinstance(value, str) else repr(value)
        pipe = into if into is not None else self.redis.pipeline()
        pipe.hset(delivery_key(did), mapping=mapping)
        if "status" in changes and changes["status"] not in _FINAL:
            pipe.zadd(OPEN, {did: time.time()}, xx=True)
        if removed:
            pipe.hdel(delivery_key(did), *removed)
        if into is None:
            pipe.execute()

    def uncount_attempt(self, did: str, *, into: Pipeline | None = None) -> None:
        """A claim that ended without a provider call (deferred) does not use up a retry."""
        (into if into is not None else self.redis).hincrby(delivery_key(did), "attempt", -1)

    def record_attempt(self, did: str, attempt: Attempt, *, into: Pipeline | None = None) -> None:
        key = f"{delivery_key(did)}:at"
        pipe = into if into is not None else self.redis.pipeline()
        shown = {f.name: getattr(attempt, f.name) for f in fields(attempt)}  # asdict deep-copies
        pipe.rpush(key, json.dumps({k: v for k, v in shown.items() if v not in (None, "")},
                                   ensure_ascii=False))
        pipe.expire(key, self.retention)
        if into is None:
            pipe.execute()

    def attempts(self, did: str) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.redis.lrange(f"{delivery_key(did)}:at", 0, -1)]

    def attempts_of(self, dids: Iterable[str]) -> dict[str, list[dict[str, Any]]]:
        ids = list(dids)
        pipe = self.redis.pipeline()
        for did in ids:
            pipe.lrange(f"{delivery_key(did)}:at", 0, -1)
        return {did: [json.loads(x) for x in rows] for did, rows in zip(ids, pipe.execute(), strict=True)}

