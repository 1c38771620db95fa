"""The roll-up decides a transaction's status inside one Redis script (atomic with its write);
`pipeline.rollup.status_of` is the same rule in Python. Both are walked over every combination
of delivery statuses, on a real redis-server."""

from __future__ import annotations

import itertools
import json

import redis

from notifier.ledger import Ledger
from notifier.models import DeliveryStatus, TxStatus
from notifier.pipeline.rollup import status_of


def test_script_and_python_agree_on_every_combination(redis_client: redis.Redis) -> None:
    ledger = Ledger(redis_client)
    names = [s.value for s in DeliveryStatus]
    cases = [()] + [c for n in (1, 2, 3) for c in itertools.product(names, repeat=n)]
    pipe = redis_client.pipeline(transaction=False)
    for i, statuses in enumerate(cases):
        pipe.hset(f"ntf:tx:t{i}", "status", "dispatching")
        for j, status in enumerate(statuses):
            pipe.hset(f"ntf:dl:t{i}.{j}", "status", status)
            pipe.rpush(f"ntf:tx:t{i}:dl", f"t{i}.{j}")
    pipe.execute()
    for i, statuses in enumerate(cases):
        written = ledger.roll_up(f"t{i}")
        assert written is not None
        assert written[0] is status_of(statuses), statuses
        assert redis_client.hget(f"ntf:tx:t{i}", "status") == written[0].value.encode()


def test_first_final_roll_up_alone_writes_the_records(redis_client: redis.Redis) -> None:
    ledger = Ledger(redis_client)
    redis_client.hset("ntf:dl:t.0", "status", "failed")
    redis_client.rpush("ntf:tx:t:dl", "t.0")
    redis_client.zadd("ntf:open", {"t.0": 1.0, "other": 1.0})
    assert ledger.roll_up("t", close=["t.0"]) == (TxStatus.FAILED, True)
    assert ledger.roll_up("t", close=["t.0"]) == (TxStatus.FAILED, False)  # e.g. the reaper again
    assert [h["event"] for h in ledger.history("t")] == ["status failed"]
    assert [t for t, _ in ledger.dead_letters()] == ["t"]
    assert redis_client.hgetall("ntf:m:notifier_transactions_finished") == {b'["failed"]': b"1"}
    assert redis_client.zrange("ntf:open", 0, -1) == [b"other"]
    assert redis_client.hexists("ntf:tx:t", "finished_at")


def test_a_changed_verdict_is_counted_once_and_dead_lettered_while_failed(
        redis_client: redis.Redis) -> None:
    """A counted verdict can change (an SMS counted sent, then failed by its receipt): the new
    one is counted once, the old one's series goes up in the revisions counter (a counter never
    goes down), and the dead letter follows the verdict."""
    ledger = Ledger(redis_client)
    redis_client.hset("ntf:dl:t.0", "status", "sent")
    redis_client.rpush("ntf:tx:t:dl", "t.0")
    assert ledger.roll_up("t") == (TxStatus.DELIVERED, True)
    redis_client.hset("ntf:dl:t.0", "status", "failed")
    assert ledger.roll_up("t") == (TxStatus.FAILED, True)
    assert ledger.roll_up("t") == (TxStatus.FAILED, False)  # re-applied: nothing more
    assert [t for t, _ in ledger.dead_letters()] == ["t"]
    assert finished(redis_client) == ({"delivered": 1.0, "failed": 1.0}, {"delivered": 1.0})
    redis_client.hset("ntf:dl:t.0", "status", "fallen_back")  # then carried on, and reached
    redis_client.hset("ntf:dl:t.1", "status", "queued")
    redis_client.rpush("ntf:tx:t:dl", "t.1")
    assert ledger.roll_up("t") == (TxStatus.DISPATCHING, False)  # no verdict while it is open
    redis_client.hset("ntf:dl:t.1", "status", "sent")
    assert ledger.roll_up("t") == (TxStatus.DELIVERED, True)
    assert ledger.dead_letters() == []
    assert finished(redis_client) == ({"delivered": 2.0, "failed": 1.0},
                                      {"delivered": 1.0, "failed": 1.0})
    assert [h["event"] for h in ledger.history("t")] == [
        "status delivered", "status failed", "status delivered"]


def test_a_transaction_finished_by_an_older_version_is_revised_not_counted_again(
        redis_client: redis.Redis) -> None:
    """Versions before counted_as counted the status a transaction first finished with."""
    ledger = Ledger(redis_client)
    redis_client.hset("ntf:tx:t", mapping={"status": "delivered", "finished_at": "1.0"})
    redis_client.hset("ntf:dl:t.0", "status", "delivered")
    redis_client.rpush("ntf:tx:t:dl", "t.0")
    assert ledger.roll_up("t") == (TxStatus.DELIVERED, False)
    redis_client.hset("ntf:dl:t.0", "status", "failed")
    assert ledger.roll_up("t") == (TxStatus.FAILED, True)
    assert finished(redis_client) == ({"failed": 1.0}, {"delivered": 1.0})


def finished(client: redis.Redis) -> tuple[dict[str, float], dict[str, float]]:
    """The finished counter and its revisions, by status."""
    return tuple(  # type: ignore[return-value]
        {json.loads(k)[0]: float(v) for k, v in client.hgetall(f"ntf:m:{name}").items()}
        for name in ("notifier_transactions_finished", "notifier_transactions_revised"))
