"""Where the bench reads what the provider received, and when.

- `FakeSink`: the Dysmsapi fake (tests/fakes/dysmsapi.py) in its own process; every number of
  an accepted SendSms/SendBatchSms is in GET /_fake/messages with its receive `timestamp`,
  `out_id` and `phone`. notifier sets OutId to the delivery ID, `<txid>.<n>`; a request
  carrying several deliveries has the OutId `<first delivery id>+<n - 1>`, and its members are
  told apart as receipts are: by the index notifier writes with each send (OutId + number).
- `SandboxSink`: the sandbox SMS provider's Redis outbox `ntf:sandbox:sms` (entries carry `at`
  and `transaction_id`); it keeps only the newest 1000 entries, so counts come from the fleet
  metric `notifier_deliveries{channel="sms",outcome="sent"}` instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Protocol

import httpx
import redis

from notifier.awaiting import delivery_for
from notifier.channels.sandbox import outbox_key
from notifier.config import normalise_phone
from notifier.metrics import KEY


@dataclass(frozen=True)
class Received:
    transaction_id: str
    delivery_id: str
    at: float  # wall clock the provider got it


class Sink(Protocol):
    name: str

    def reset(self) -> None: ...
    def count(self) -> int: ...
    def received(self) -> list[Received]: ...


class FakeSink:
    name = "dysmsapi-fake"

    def __init__(self, port: int, client: redis.Redis) -> None:
        self.base = f"http://127.0.0.1:{port}/_fake"
        self.http = httpx.Client(timeout=30, trust_env=False)
        self.redis = client
        self.members: dict[tuple[str, str], str] = {}  # (batch OutId, number) -> delivery

    def reset(self) -> None:
        self.http.post(f"{self.base}/reset").raise_for_status()

    def count(self) -> int:
        return int(self.http.get(f"{self.base}/stats").json()["messages"])

    def received(self) -> list[Received]:
        rows = self.http.get(f"{self.base}/messages").json()
        out = []
        for m in rows:
            if m.get("out_id"):
                delivery = self._delivery(str(m["out_id"]), str(m["biz_id"]), str(m["phone"]))
                out.append(Received(delivery.split(".")[0], delivery, float(m["timestamp"])))
        return out

    def _delivery(self, out_id: str, biz_id: str, phone: str) -> str:
        if "+" not in out_id:
            return out_id
        key = (out_id, phone)
        if key not in self.members:
            # Not indexed yet (read before the send was recorded): counted under the request's
            # id and number for now, resolved on a later read.
            found = delivery_for(self.redis, out_id, biz_id, normalise_phone(phone))
            if found is None:
                return f"{out_id}|{phone}"
            self.members[key] = found
        return self.members[key]


class SandboxSink:
    name = "sandbox-outbox"

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self.base = 0

    def _sent(self) -> int:
        total = 0.0
        for field, value in self.redis.hgetall(KEY + "notifier_deliveries").items():
            channel, _provider, outcome = json.loads(field)
            if channel == "sms" and outcome == "sent":
                total += float(value)
        return int(total)

    def reset(self) -> None:
        self.redis.delete(outbox_key("sms"))
        self.base = self._sent()

    def count(self) -> int:
        return self._sent() - self.base

    def received(self) -> list[Received]:
        rows = [json.loads(r) for r in self.redis.lrange(outbox_key("sms"), 0, -1)]
        return [Received(str(e["transaction_id"]), str(e["delivery_id"]), float(e["at"]))
                for e in rows]
