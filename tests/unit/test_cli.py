"""The CLI's answers to bad configuration and arguments: one line naming the problem, no
traceback (no Redis needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from notifier.cli import main

VALID = """\
channels:
  sms: {provider: sandbox}
  email: {provider: sandbox}
recipients:
  alice: {phone: "+8613800138000", email: alice@example.com}
routes:
  - match: {}
    to: [alice]
    channels: [email]
"""


@pytest.fixture(autouse=True)
def _environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # main() sets NOTIFIER_CONFIG for its children: put it back after each test
    monkeypatch.delenv("NOTIFIER_CONFIG", raising=False)
    monkeypatch.delenv("NOTIFIER_REDIS_URL", raising=False)


def write(tmp_path: Path, text: str | bytes) -> str:
    path = tmp_path / "notifier.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("name", ["NOTIFIER_API_TOKEN", "NOTIFIER_CALLBACK_TOKEN"])
def test_check_config_refuses_a_blank_token(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    # systemd runs check-config (ExecStartPre) with the API's EnvironmentFile
    monkeypatch.setenv(name, "")
    code = main(["--config", write(tmp_path, VALID), "check-config"])
    err = capsys.readouterr().err
    assert code == 2 and f"{name}: set but empty" in err, (code, err)
    monkeypatch.delenv(name)
    assert main(["--config", write(tmp_path, VALID), "check-config"]) == 0  # unset: allowed
