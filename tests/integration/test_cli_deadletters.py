"""`notifier deadletters` against a real Redis: what the operator sees for each action."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis

from notifier.cli import main
from notifier.ledger_keys import DEADLETTERS
from tests.support.configs import sandbox_email_config


def test_drop_says_what_it_dropped_and_the_list_no_longer_shows_it(
        redis_url: str, redis_client: redis.Redis, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    # A silent success reads like a command that did nothing: the operator dropping a dead
    # letter during an incident must see which one went.
    config = str(sandbox_email_config(tmp_path, redis_url))
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
