"""Transaction IDs: ULIDs (48-bit ms time + 80 random bits, Crockford base32), time-sortable;
the OutIds of requests carrying several deliveries."""

from __future__ import annotations

import os
import threading

import pytest

from notifier import ids
from notifier.ids import _ALPHABET, batch_out_id, random16, ulid


def decode(text: str) -> int:
    value = 0
    for char in text:
        value = value * 32 + _ALPHABET.index(char)
    return value


def test_ulid_encodes_time_and_randomness(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ids, "random16", lambda: bytes(range(1, 17)))
    text = ulid(1469922850.259)
    assert len(text) == 26 and set(text) <= set(_ALPHABET)
    assert decode(text) >> 80 == 1469922850259
    assert text.startswith("01ARZ3NDEK")  # the ULID spec's example time, 1469922850259 ms
    assert text[10:] == "".join(_ALPHABET[b & 31] for b in range(1, 17))  # a digit per random byte
    monkeypatch.setattr(ids, "random16", lambda: bytes([31 + 32 * (k % 8) for k in range(16)]))
    assert ulid(1469922850.259)[10:] == "Z" * 16  # only a byte's low 5 bits count: uniform digits
    assert ulid(1469922850.260)[:10] == "01ARZ3NDEM"  # the next millisecond's digits


def test_ulids_sort_by_time() -> None:
    ids = [ulid(t) for t in (1.0, 2.5, 1_000_000.0, 1_800_000_000.123)]
    assert ids == sorted(ids)
    assert len({ulid() for _ in range(1000)}) == 1000


def test_pooled_random_bytes_are_never_handed_out_twice_across_threads() -> None:
    drawn: list[list[bytes]] = [[] for _ in range(8)]

    def draw(into: list[bytes]) -> None:
        into.extend(random16() for _ in range(5000))

    threads = [threading.Thread(target=draw, args=(into,)) for into in drawn]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    every = [chunk for into in drawn for chunk in into]
    assert len(set(every)) == len(every) == 40000 and {len(c) for c in every} == {16}


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_forked_child_does_not_repeat_its_parents_random_bytes() -> None:
    random16()  # the pool now holds the parent's next chunks
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        os.write(write, random16())
        os._exit(0)
    os.close(write)
    from_child = os.read(read, 16)
    os.close(read)
    os.waitpid(child, 0)
    assert len(from_child) == 16 and from_child != random16()


def test_batch_out_ids_differ_whenever_the_members_do() -> None:
    # Resent after a crash with new company, the first member must not reuse the old OutId:
    # a look-up of the new company's number would match the old request's message.
    first, again = batch_out_id(["tx-1.0", "tx-2.0"]), batch_out_id(["tx-1.0", "tx-3.0"])
    assert first != again
    assert first.startswith("tx-1.0+1.") and again.startswith("tx-1.0+1.")
    assert batch_out_id(["tx-1.0", "tx-2.0"]) == first  # the same request: the same OutId
