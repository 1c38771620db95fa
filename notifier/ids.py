"""Time-sortable identifiers (ULID layout: 48-bit ms timestamp + 80 random bits, Crockford)."""

from __future__ import annotations

import hashlib
import os
import time
from collections import deque

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


# IDs are made on the ingest hot path. The random part's 16 digits are 16 random bytes, each
# mapped to a digit by its low 5 bits (256 is a multiple of 32: uniform), in one C call; the
# first 10 digits, exactly the 48-bit millisecond, are computed once per millisecond.
_DIGIT_OF_BYTE = bytes(_ALPHABET[b & 31].encode()[0] for b in range(256))
_PAIRS = [a + b for a in _ALPHABET for b in _ALPHABET]
_now: tuple[int, str] = (-1, "")  # (millisecond, its digits), replaced whole: thread-safe

# Random bytes come from the OS's CSPRNG a pool at a time: a getrandom call per ID was a system
# call per webhook on the ingest path. deque.popleft is atomic, so no two threads ever get the
# same chunk; a forked child (Celery's prefork pool) drops the pool it inherited, or it would
# repeat its parent's next IDs.
_CHUNK, _CHUNKS_PER_DRAW = 16, 256
_pool: deque[bytes] = deque()
os.register_at_fork(after_in_child=_pool.clear)


def random16() -> bytes:
    """16 bytes from os.urandom, none ever handed out twice."""
    while True:
        try:
            return _pool.popleft()
        except IndexError:  # empty (or emptied by another thread since): draw more
            block = os.urandom(_CHUNK * _CHUNKS_PER_DRAW)
            _pool.extend([block[i:i + _CHUNK] for i in range(0, len(block), _CHUNK)])


def ulid(now: float | None = None) -> str:
    global _now  # noqa: PLW0603 - a per-process cache of one value
    millis = int((time.time() if now is None else now) * 1000)
    cached, digits = _now
    if millis != cached:
        digits = "".join([_PAIRS[(millis >> shift) & 0x3FF] for shift in (40, 30, 20, 10, 0)])
        _now = (millis, digits)
    return digits + random16().translate(_DIGIT_OF_BYTE).decode()


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
