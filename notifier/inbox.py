"""A store-first inbox for provider pushes (Aliyun SmsReport / SmsUp).

A push is acknowledged only after its records are in Redis; applying them happens later, in a
worker, at least once. Each record is stored once under its dedup key (SET NX), so a re-pushed
record is recognised and changes nothing. Pending records sit in a ZSET scored by when they are
next due: an applier claims due records by pushing their score one lease ahead (a crashed
applier's records come due again when the lease runs out), and a record that cannot be applied
yet (a receipt that beat its send) is simply rescheduled instead of dropped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import redis
from pydantic import BaseModel, ValidationError

from notifier.config import e164_or_raw, mask_phone

M = TypeVar("M", bound=BaseModel)
R = TypeVar("R")

_STORE = """
-- KEYS: queue, record keys...; ARGV: now, ttl_s, member1, json1, member2, json2 ...
local out = {}
for i = 2, #KEYS do
  local member, body = ARGV[1 + 2 * (i - 1)], ARGV[2 + 2 * (i - 1)]
  if redis.call('SET', KEYS[i], body, 'NX', 'EX', ARGV[2]) then
    redis.call('ZADD', KEYS[1], ARGV[1], member)
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
"""

_CLAIM = """
-- KEYS: queue; ARGV: now, until, limit
local items = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
for _, member in ipairs(items) do
  redis.call('ZADD', KEYS[1], ARGV[2], member)
end
return items
"""


class InvalidPush(ValueError):
    """A push body that cannot be stored at all (not a JSON array); `problems` say why."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class InvalidRecord:
    """One record of a push that cannot be stored. Neither field carries a full phone number
    or a reply text: both are logged."""

    index: int
    sender: str  # the record's phone_number, masked ("" when it has none)
    problems: tuple[str, ...]  # "biz_id: Field required", ...


@dataclass(frozen=True)
class Checked(Generic[R]):
    """A push validated record by record: what can be stored, and what cannot."""

    records: list[R]
    invalid: list[InvalidRecord]

    @property
    def problems(self) -> list[str]:
        return [f"[{bad.index}].{problem}" for bad in self.invalid for problem in bad.problems]

    @property
    def refused(self) -> bool:
        """Records came, and not one of them can be stored."""
        return bool(self.invalid) and not self.records


def check_records(payload: object, kind: str, model: type[M]) -> Checked[M]:
    """Validate a push body, a JSON array of `model` records, each record on its own: one bad
    record must not cost the good ones of the same push (Aliyun re-pushes a refused push as a
    whole, three times, then drops it). `InvalidPush` only for a body that is not an array."""
    if not isinstance(payload, list):
        raise InvalidPush([f"body: expected a JSON array of {kind} records"])
    checked: Checked[M] = Checked([], [])
    for i, item in enumerate(payload):
        try:
            checked.records.append(model.model_validate(item))
        except ValidationError as exc:
            checked.invalid.append(InvalidRecord(i, _sender(item), tuple(
                f"{'.'.join(map(str, e['loc'])) or 'record'}: "
                f"{e['msg'].removeprefix('Value error, ')}" for e in exc.errors())))
    return checked


def _sender(item: object) -> str:
    """The record's sender, masked as everywhere else: in E.164 when it reads as a number."""
    phone = item.get("phone_number") if isinstance(item, dict) else None
    if not isinstance(phone, str | int):
        return ""
    return mask_phone(e164_or_raw(str(phone)))


def text(value: object) -> str:
    """A Redis reply (bytes, str or None) as text."""
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode()
    return "" if value is None else str(value)


@dataclass(frozen=True)
class Claimed:
    member: str
    record: dict[str, Any]  # what was stored, plus "received_at"


class Inbox:
    def __init__(self, client: redis.Redis, name: str, retention: float,
                 lease: float = 60.0) -> None:
        self.redis = client
        self.queue = f"ntf:{name}:queue"
        self.prefix = f"ntf:{name}:rec:"
        self.retention = max(int(retention), 60)
        self.lease = lease
        self._store = client.register_script(_STORE)
        self._claim = client.register_script(_CLAIM)

    def store(self, items: Sequence[tuple[str, Mapping[str, Any]]]) -> list[bool]:
        """Store (dedup key, record) pairs in one atomic step; True for each record not seen
        before. Raises `redis.RedisError` when nothing could be stored (answer 5xx then)."""
        if not items:
            return []
        now = time.time()
        args: list[str | float | int] = [repr(now), self.retention]
        for member, record in items:
            body = {**record, "received_at": now}
            args += [member, json.dumps(body, ensure_ascii=False, sort_keys=True)]
        keys = [self.queue, *(self.prefix + member for member, _ in items)]
        result = self._store(keys=keys, args=args)
        return [bool(int(flag)) for flag in result]

    def claim(self, limit: int = 100, now: float | None = None) -> list[Claimed]:
        at = time.time() if now is None else now
        members = [text(m) for m in self._claim(keys=[self.queue],
                                                args=[repr(at), repr(at + self.lease), limit])]
        if not members:
            return []
        bodies = self.redis.mget([self.prefix + m for m in members])
        claimed: list[Claimed] = []
        for member, body in zip(members, bodies, strict=True):
            if body is None:  # expired with retention: nothing left to apply
                self.done(member)
                continue
            claimed.append(Claimed(member, json.loads(text(body))))
        return claimed

    def done(self, member: str) -> None:
        """Applied (or given up on). The record itself stays as the dedup marker."""
        self.redis.zrem(self.queue, member)

    def later(self, member: str, due: float) -> None:
        self.redis.zadd(self.queue, {member: due})

    def due(self, now: float | None = None) -> int:
        return int(self.redis.zcount(self.queue, "-inf", repr(time.time() if now is None else now)))

    def pending(self) -> int:
        return int(self.redis.zcard(self.queue))

    def record(self, member: str) -> dict[str, Any] | None:
        body = self.redis.get(self.prefix + member)
        return None if body is None else dict(json.loads(text(body)))
