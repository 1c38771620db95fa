"""Time-sortable identifiers (ULID layout: 48-bit ms timestamp + 80 random bits, Crockford)."""

from __future__ import annotations

import hashlib
import os
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


# Two digits per 10 bits: a ULID is 13 table look-ups (IDs are made on the ingest hot path).
_PAIRS = [a + b for a in _ALPHABET for b in _ALPHABET]


def ulid(now: float | None = None) -> str:
    millis = int((time.time() if now is None else now) * 1000)
    value = (millis << 80) | int.from_bytes(os.urandom(10), "big")
    return "".join([_PAIRS[(value >> shift) & 0x3FF] for shift in range(120, -10, -10)])


def new_transaction_id() -> str:
    return f"tx-{ulid()}"


def delivery_id(transaction_id: str, index: int) -> str:
    """Deterministic, so a redelivered dispatch task recreates the same deliveries."""
    return f"{transaction_id}.{index}"


def batch_out_id(delivery_ids: list[str]) -> str:
    """The provider OutId of one request carrying several deliveries: the first member, how
    many more, and a digest of all of them. Two requests with different members never share an
    OutId, even when they start with the same delivery (a member resent with new company after
    a crash, or halved out of a refused request): a look-up or a receipt by OutId and number
    then always names the request that delivery went in. (Recorded as `sent_as` before the
    request leaves, so no one has to recompute it.)"""
    digest = hashlib.blake2b("|".join(delivery_ids).encode(), digest_size=4).hexdigest()
    return f"{delivery_ids[0]}+{len(delivery_ids) - 1}.{digest}"


def fallback_id(parent: str, step: int) -> str:
    return f"{parent}.f{step}"
