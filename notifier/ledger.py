"""The ledger: transactions, deliveries and attempts in Redis, and the dedup/idempotency keys.

Every key expires after the retention period. Writes that decide something (accepting a
transaction, claiming a delivery) are single Lua scripts so two API or worker processes can
never both win.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from typing import Any

import redis
from redis.client import Pipeline

from notifier.metrics import metric_field, metric_key
from notifier.models import DeliveryStatus, Event, Source, TxStatus

PREFIX = "ntf:"
Fields = Mapping[Any, Any]  # redis-py types replies as bytes | str; ours are always bytes


def text(value: object) -> str:
    """A Redis reply (bytes here, since clients don't decode) as str."""
    return value.decode() if isinstance(value, bytes) else str(value)

OUTBOX = f"{PREFIX}outbox"  # accepted transactions not yet fanned out (txid -> accepted at)
DEADLETTERS = f"{PREFIX}deadletters"  # failed transactions (txid -> failed at)
OPEN = f"{PREFIX}open"  # deliveries not yet final (delivery id -> created at), for the reaper
_FINAL = ("sent", "delivered", "failed", "fallen_back", "suppressed")


def tx_key(txid: str) -> str:
    return f"{PREFIX}tx:{txid}"


def delivery_key(did: str) -> str:
    return f"{PREFIX}dl:{did}"


class AcceptOutcome(StrEnum):
    NEW = "new"
    DUPLICATE = "duplicate"  # same Alertmanager group content within the window
    REPLAY = "replay"  # same idempotency key, same body
    CONFLICT = "conflict"  # same idempotency key, other body


@dataclass(frozen=True)
class AcceptResult:
    outcome: AcceptOutcome
    transaction_id: str


@dataclass
class TransactionRecord:
    id: str
    source: str
    status: str
    event: Event
    created_at: float
    updated_at: float
    finished_at: float | None = None
    receiver: str = ""
    suppressed_count: int = 0


@dataclass
class DeliveryRecord:
    id: str
    transaction_id: str
    channel: str
    recipient: str
    address: str
    kind: str
    status: str = DeliveryStatus.QUEUED
    attempt: int = 0
    provider_index: int = 0  # which of the channel's providers is being tried
    created_at: float = 0.0
    updated_at: float = 0.0
    next_at: float | None = None
    fallback_of: str = ""
    fallback_chain: list[str] = field(default_factory=list)  # channels still to try after this
    provider: str = ""
    provider_message_id: str = ""
    request_id: str = ""
    error_code: str = ""
    error_class: str = ""
    reason: str = ""
    digest_id: str = ""  # on a delivery merged into a digest: the digest that carries it
    digest_of: list[str] = field(default_factory=list)  # on a digest: the deliveries it carries
    sent_at: float | None = None
    delivered_at: float | None = None
    claim_token: str = ""
    claim_at: float | None = None
    maybe_sent_at: float | None = None  # a send timed out after leaving: look it up first

    def to_redis(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for key, value in asdict(self).items():
            if value is None:
                continue
            out[key] = json.dumps(value) if isinstance(value, list) else str(value)
        return out

    @classmethod
    def from_redis(cls, raw: Fields) -> DeliveryRecord:
        data = {text(k): text(v) for k, v in raw.items()}
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in data:
                continue
            value = data[f.name]
            if f.name in ("fallback_chain", "digest_of"):
                kwargs[f.name] = json.loads(value)
            elif f.name in ("attempt", "provider_index"):
                kwargs[f.name] = int(value)
            elif f.name in _FLOAT_FIELDS:
                kwargs[f.name] = float(value)
            else:
                kwargs[f.name] = value
        return cls(**kwargs)


@dataclass(frozen=True)
class Attempt:
    at: float
    provider: str
    outcome: str  # sent, transient, maybe_sent, permanent, account, recipient_budget, deferred,
    # circuit_open, found_after_timeout, receipt, digest ...
    error_code: str = ""
    message: str = ""
    provider_message_id: str = ""
    latency_ms: float | None = None
    retry_at: float | None = None


class ClaimResult(StrEnum):
    CLAIMED = "claimed"
    RECLAIMED = "reclaimed"  # the previous holder vanished mid-send: the provider may have it
    BUSY = "busy"  # someone else holds a fresh claim
    DONE = "done"  # already terminal
    MISSING = "missing"


_FLOAT_FIELDS = ("created_at", "updated_at", "next_at", "sent_at", "delivered_at", "claim_at",
                 "maybe_sent_at")

_ACCEPT = """
-- One round trip for the whole acceptance: dedup/idempotency check, the transaction, its
-- outbox entry, the first history line and the events counter.
-- KEYS: tx, dedup (or ''), idem (or ''), outbox, events metric hash
-- ARGV: txid, now, retention_s, dedup_ttl_ms, idem_ttl_s, body_hash, source,
--       metric field new, duplicate, replay, n_fields, f1, v1, ...
local function note(txid, what)
  local log = 'ntf:tx:' .. txid .. ':log'
  redis.call('RPUSH', log, cjson.encode({at = tonumber(ARGV[2]), event = what, source = ARGV[7]}))
  redis.call('EXPIRE', log, ARGV[3])
end
local function suppressed(outcome, txid, field)
  redis.call('HINCRBY', 'ntf:tx:' .. txid, 'suppressed_count', 1)
  note(txid, outcome .. '_suppressed')
  redis.call('HINCRBYFLOAT', KEYS[5], field, 1)
  return {outcome, txid}
end
if KEYS[2] ~= '' then
  local orig = redis.call('GET', KEYS[2])
  if orig then return suppressed('duplicate', orig, ARGV[9]) end
end
if KEYS[3] ~= '' then
  local prior = redis.call('GET', KEYS[3])
  if prior then
    local sep = string.find(prior, '|', 1, true)
    local txid, hash = string.sub(prior, 1, sep - 1), string.sub(prior, sep + 1)
    if hash == ARGV[6] then return suppressed('replay', txid, ARGV[10]) end
    return {'conflict', txid}
  end
end
local n = tonumber(ARGV[11])
for i = 0, n - 1 do
  redis.call('HSET', KEYS[1], ARGV[12 + 2 * i], ARGV[13 + 2 * i])
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
if KEYS[2] ~= '' then redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[4]) end
if KEYS[3] ~= '' then redis.call('SET', KEYS[3], ARGV[1] .. '|' .. ARGV[6], 'EX', ARGV[5]) end
redis.call('ZADD', KEYS[4], ARGV[2], ARGV[1])
note(ARGV[1], 'accepted')
redis.call('HINCRBYFLOAT', KEYS[5], ARGV[8], 1)
return {'new', ARGV[1]}
"""

_ADD_DELIVERIES = """
-- KEYS: open index, then per delivery: its hash, its transaction's delivery list
-- ARGV: retention_s, now, then per delivery: id, JSON object of its fields
local created = {}
for i = 0, (#KEYS - 1) / 2 - 1 do
  local key, list = KEYS[2 + 2 * i], KEYS[3 + 2 * i]
  local id, fields = ARGV[3 + 2 * i], cjson.decode(ARGV[4 + 2 * i])
  if redis.call('HEXISTS', key, 'transaction_id') == 0 then
    for name, value in pairs(fields) do redis.call('HSET', key, name, value) end
    redis.call('EXPIRE', key, ARGV[1])
    redis.call('RPUSH', list, id)
    redis.call('EXPIRE', list, ARGV[1])
    redis.call('ZADD', KEYS[1], ARGV[2], id)
    table.insert(created, id)
  end
end
return created
"""

_CLAIM = """
-- KEYS: delivery; ARGV: token, now, lease_s
local st = redis.call('HMGET', KEYS[1], 'status', 'claim_token', 'claim_at')
local status = st[1]
if not status then return 'missing' end
local result = 'claimed'
if status == 'sending' then
  local stale = (tonumber(ARGV[2]) - tonumber(st[3] or '0')) > tonumber(ARGV[3])
  if st[2] ~= ARGV[1] and not stale then return 'busy' end
  result = 'reclaimed'
elseif status ~= 'queued' and status ~= 'retrying' and status ~= 'deferred' then
  return 'done'
end
redis.call('HSET', KEYS[1], 'status', 'sending', 'claim_token', ARGV[1], 'claim_at', ARGV[2],
           'updated_at', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'attempt', 1)
return result
"""


class Ledger:
    def __init__(self, client: redis.Redis, retention: float = 7 * 86400.0) -> None:
        self.redis = client
        self.retention = int(retention)
        self._accept = client.register_script(_ACCEPT)
        self._claim = client.register_script(_CLAIM)
        self._add = client.register_script(_ADD_DELIVERIES)

    # -- transactions ---------------------------------------------------------------------

    def accept(
        self,
        txid: str,
        event: Event,
        source: Source,
        *,
        receiver: str = "",
        dedup_key: str | None = None,
        dedup_window: float = 600.0,
        idempotency_key: str | None = None,
        idempotency_ttl: float = 86400.0,
        body_hash: str = "",
    ) -> AcceptResult:
        now = time.time()
        record = {
            "id": txid,
            "source": source.value,
            "status": TxStatus.ACCEPTED.value,
            "event": json.dumps(event.to_json(), ensure_ascii=False),
            "created_at": repr(now),
            "updated_at": repr(now),
            "receiver": receiver,
        }
        flat: list[str] = []
        for key, value in record.items():
            flat += [key, value]
        keys = [
            tx_key(txid),
            f"{PREFIX}dedup:{dedup_key}" if dedup_key else "",
            f"{PREFIX}idem:{idempotency_key}" if idempotency_key else "",
            OUTBOX,
            metric_key("notifier_events_received"),
        ]
        fields = [metric_field("notifier_events_received", source=source.value, outcome=o)
                  for o in ("new", "duplicate", "replay")]
        args: list[str | int] = [txid, repr(now), self.retention, int(dedup_window * 1000),
                                 int(idempotency_ttl), body_hash, source.value, *fields,
                                 len(record), *flat]
        outcome, existing = self._accept(keys=keys, args=args)
        return AcceptResult(AcceptOutcome(text(outcome)), text(existing))

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
