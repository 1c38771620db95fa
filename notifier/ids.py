"""Time-sortable identifiers (ULID layout: 48-bit ms timestamp + 80 random bits, Crockford)."""

from __future__ import annotations

import os
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def ulid(now: float | None = None) -> str:
    millis = int((time.time() if now is None else now) * 1000)
    value = (millis << 80) | int.from_bytes(os.urandom(10), "big")
    chars = []
    for _ in range(26):
        value, digit = divmod(value, 32)
        chars.append(_ALPHABET[digit])
    return "".join(reversed(chars))


def new_transaction_id() -> str:
    return f"tx-{ulid()}"


def delivery_id(transaction_id: str, index: int) -> str:
    """Deterministic, so a redelivered dispatch task recreates the same deliveries."""
    return f"{transaction_id}.{index}"


def fallback_id(parent: str, step: int) -> str:
    return f"{parent}.f{step}"
