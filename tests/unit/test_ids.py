"""Transaction IDs: ULIDs (48-bit ms time + 80 random bits, Crockford base32), time-sortable;
the OutIds of requests carrying several deliveries."""

from __future__ import annotations

import os

import pytest

from notifier.ids import _ALPHABET, batch_out_id, ulid


def decode(text: str) -> int:
    value = 0
    for char in text:
        value = value * 32 + _ALPHABET.index(char)
    return value


def test_ulid_encodes_time_and_randomness(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "urandom", lambda n: bytes(range(1, n + 1)))
    text = ulid(1469922850.259)
    assert len(text) == 26 and set(text) <= set(_ALPHABET)
    assert decode(text) >> 80 == 1469922850259
    assert text.startswith("01ARZ3NDEK")  # the ULID spec's example time, 1469922850259 ms
    assert text[10:] == "".join(_ALPHABET[b & 31] for b in range(1, 17))  # a digit per random byte
    monkeypatch.setattr(os, "urandom", lambda n: bytes([31 + 32 * (k % 8) for k in range(n)]))
    assert ulid(1469922850.259)[10:] == "Z" * 16  # only a byte's low 5 bits count: uniform digits
    assert ulid(1469922850.260)[:10] == "01ARZ3NDEM"  # the next millisecond's digits


def test_ulids_sort_by_time() -> None:
    ids = [ulid(t) for t in (1.0, 2.5, 1_000_000.0, 1_800_000_000.123)]
    assert ids == sorted(ids)
    assert len({ulid() for _ in range(1000)}) == 1000


def test_batch_out_ids_differ_whenever_the_members_do() -> None:
    # Resent after a crash with new company, the first member must not reuse the old OutId:
    # a look-up of the new company's number would match the old request's message.
    first, again = batch_out_id(["tx-1.0", "tx-2.0"]), batch_out_id(["tx-1.0", "tx-3.0"])
    assert first != again
    assert first.startswith("tx-1.0+1.") and again.startswith("tx-1.0+1.")
    assert batch_out_id(["tx-1.0", "tx-2.0"]) == first  # the same request: the same OutId
