"""`notifier deadletters` against a real Redis: what the operator sees for each action."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis
import yaml

from notifier.cli import main
from notifier.ledger_keys import DEADLETTERS


def write_config(tmp_path: Path, redis_url: str) -> str:
    path = tmp_path / "notifier.yaml"
    path.write_text(yaml.safe_dump({
        "redis_url": redis_url,
        "channels": {"email": {"provider": "sandbox"}},
        "recipients": {"alice": {"email": "alice@example.com"}},
        "routes": [{"match": {}, "to": ["alice"], "channels": ["email"]}],
    }), encoding="utf-8")
    return str(path)


def test_drop_says_what_it_dropped_and_the_list_no_longer_shows_it(
        redis_url: str, redis_client: redis.Redis, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    # A silent success reads like a command that did nothing: the operator dropping a dead
    # letter during an incident must see which one went.
    config = write_config(tmp_path, redis_url)
    txid = f"cli-drop-{time.time_ns()}"
    redis_client.zadd(DEADLETTERS, {txid: time.time()})

    assert main(["--config", config, "deadletters"]) == 0
    assert txid in capsys.readouterr().out

    assert main(["--config", config, "deadletters", "drop", txid]) == 0
    assert capsys.readouterr().out.strip() == f"dropped {txid}"

    assert main(["--config", config, "deadletters", "drop", txid]) == 1
    assert "is not a dead letter" in capsys.readouterr().err
    assert main(["--config", config, "deadletters"]) == 0
    assert txid not in capsys.readouterr().out
