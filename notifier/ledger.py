"""The ledger: transactions, deliveries and attempts in Redis, and the dedup/idempotency keys.

Every key expires after the retention period. Writes that decide something (accepting a
transaction, claiming a delivery) are single Lua scripts so two API or worker processes can
never both win.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from typing import Any

import redis
from redis.client import Pipeline

from notifier import ledger_scripts as scripts
from notifier.ledger_accept import OUTBOX, AcceptCall, accept_result
from notifier.models import Event, TxStatus
from notifier.records import (
    AcceptOutcome,
    AcceptResult,
    Attempt,
    ClaimResult,
    DeliveryRecord,
    Fields,
    TransactionRecord,
    text,
)

__all__ = ["AcceptOutcome", "AcceptResult", "Attempt", "ClaimResult", "DeliveryRecord", "Ledger",
           "TransactionRecord", "text"]

PREFIX = "ntf:"

DEADLETTERS = f"{PREFIX}deadletters"  # failed transactions (txid -> failed at)
OPEN = f"{PREFIX}open"  # deliveries not yet final (delivery id -> created at), for the reaper
_FINAL = ("sent", "delivered", "failed", "fallen_back", "suppressed")


def tx_key(txid: str) -> str:
    return f"{PREFIX}tx:{txid}"


def delivery_key(did: str) -> str:
    return f"{PREFIX}dl:{did}"


class Ledger:
    def __init__(self, client: redis.Redis, retention: float = 7 * 86400.0) -> None:
        self.redis = client
        self.retention = int(retention)
        self._accept = client.register_script(scripts.ACCEPT)
        self._claim = client.register_script(scripts.CLAIM)
        self._add = client.register_script(scripts.ADD_DELIVERIES)

    # -- transactions ---------------------------------------------------------------------

    def accept(self, call: AcceptCall) -> AcceptResult:
        """Store an event and queue its dispatch task (see notifier.ledger_accept)."""
        return accept_result(self._accept(keys=call.keys, args=call.args))

    def transaction(self, txid: str) -> TransactionRecord | None:
        raw: Fields = self.redis.hgetall(tx_key(txid))
        if not raw:
            return None
        data = {text(k): text(v) for k, v in raw.items()}
        return TransactionRecord(
            id=data["id"],
            source=data["source"],
            status=data["status"],
            event=Event.from_json(json.loads(data["event"])),
            created_at=float(data["created_at"]),
            updated_at=float(data["updated_at"]),
            finished_at=float(data["finished_at"]) if "finished_at" in data else None,
            receiver=data.get("receiver", ""),
            suppressed_count=int(data.get("suppressed_count", "0")),
        )

    def set_status(self, txid: str, status: TxStatus) -> bool:
        """Set a transaction's status; True only for the call that first made it terminal."""
        now = time.time()
        key = tx_key(txid)
        pipe = self.redis.pipeline()
        pipe.hset(key, mapping={"status": status.value, "updated_at": repr(now)})
        if status.terminal:
            pipe.hsetnx(key, "finished_at", repr(now))
        results = pipe.execute()
        first_finish = bool(status.terminal and results[1])
        if first_finish:
            self.log(txid, f"status {status.value}")
        return first_finish

    def log(self, txid: str, what: str, **detail: str) -> None:
        entry = json.dumps({"at": time.time(), "event": what, **detail}, ensure_ascii=False)
        key = f"{tx_key(txid)}:log"
        pipe = self.redis.pipeline()
        pipe.rpush(key, entry)
        pipe.ltrim(key, -500, -1)
        pipe.expire(key, self.retention)
        pipe.execute()

    def history(self, txid: str) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.redis.lrange(f"{tx_key(txid)}:log", 0, -1)]

    def outbox_older_than(self, age: float, limit: int = 500) -> list[str]:
        cutoff = time.time() - age
        return [text(x) for x in self.redis.zrangebyscore(OUTBOX, "-inf", cutoff, 0, limit)]

    def outbox_expect(self, txid: str, within: float) -> None:
        """Its dispatch task is on the broker: sweep it only if not fanned out `within` s."""
        self.redis.zadd(OUTBOX, {txid: time.time() + within - 5.0}, xx=True)

    def fanned_out(self, txid: str) -> None:
        self.redis.zrem(OUTBOX, txid)

    def dead_letter(self, txid: str) -> None:
        self.redis.zadd(DEADLETTERS, {txid: time.time()})

    def dead_letters(self, limit: int = 100) -> list[tuple[str, float]]:
        rows: list[Any] = self.redis.zrevrange(DEADLETTERS, 0, limit - 1, withscores=True)
        return [(text(member), float(score)) for member, score in rows]

    def clear_dead_letter(self, txid: str) -> bool:
        return bool(self.redis.zrem(DEADLETTERS, txid))

    # -- deliveries -----------------------------------------------------------------------

    def add_deliveries(self, records: Sequence[DeliveryRecord]) -> list[str]:
        """Create deliveries that do not exist yet (a redelivered dispatch adds nothing twice)."""
        if not records:
            return []
        now = time.time()
        keys: list[str] = [OPEN]
        args: list[str | int] = [self.retention, repr(now)]
        for record in records:
            record.created_at = record.updated_at = now
            keys += [delivery_key(record.id), f"{tx_key(record.transaction_id)}:dl"]
            args += [record.id, json.dumps(record.to_redis(), ensure_ascii=False)]
        # All or nothing per delivery: a worker killed half-way must not leave a delivery that
        # exists but is on no list (a re-run dispatch would skip it and lose the message).
        created = self._add(keys=keys, args=args)
        return [text(x) for x in created]

    def delivery(self, did: str) -> DeliveryRecord | None:
        raw: Fields = self.redis.hgetall(delivery_key(did))
        return DeliveryRecord.from_redis(raw) if raw and b"transaction_id" in raw else None

    def delivery_ids(self, txid: str) -> list[str]:
        return [text(x) for x in self.redis.lrange(f"{tx_key(txid)}:dl", 0, -1)]

    def deliveries(self, txid: str) -> list[DeliveryRecord]:
        ids = self.delivery_ids(txid)
        pipe = self.redis.pipeline()
        for did in ids:
            pipe.hgetall(delivery_key(did))
        return [DeliveryRecord.from_redis(raw) for raw in pipe.execute() if raw]

    def open_older_than(self, age: float, limit: int = 500) -> list[str]:
        cutoff = time.time() - age
        return [text(x) for x in self.redis.zrangebyscore(OPEN, "-inf", cutoff, 0, limit)]

    def close_open(self, *dids: str) -> None:
        """Final and rolled up: the reaper need not look at these again."""
        if dids:
            self.redis.zrem(OPEN, *dids)

    def touch_open(self, did: str) -> None:
        self.redis.zadd(OPEN, {did: time.time()}, xx=True)

    def claim(self, did: str, token: str, lease: float) -> ClaimResult:
        result = self._claim(keys=[delivery_key(did)], args=[token, repr(time.time()), lease])
        return ClaimResult(text(result))

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

    def uncount_attempt(self, did: str) -> None:
        """A claim that ended without a provider call (deferred) does not use up a retry."""
        self.redis.hincrby(delivery_key(did), "attempt", -1)

    def record_attempt(self, did: str, attempt: Attempt, *, into: Pipeline | None = None) -> None:
        key = f"{delivery_key(did)}:at"
        pipe = into if into is not None else self.redis.pipeline()
        pipe.rpush(key, json.dumps({k: v for k, v in asdict(attempt).items() if v not in (None, "")},
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
