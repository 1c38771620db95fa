"""The CLI's answers to bad configuration and arguments: one line naming the problem, no
traceback (no Redis needed)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from notifier.cli import main
from notifier.redis_conn import redacted
from tests.support.servers import clean_env

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


def test_an_api_token_without_a_callback_token_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    # With the API locked, open callbacks would let anyone post SMS replies (confirming drill
    # phases for operators who never answered) and delivery receipts (closing an SMS as
    # delivered that failed, or failing one that arrived, which pages on the fallback too).
    monkeypatch.setenv("NOTIFIER_API_TOKEN", "api-token-0123")
    monkeypatch.delenv("NOTIFIER_CALLBACK_TOKEN", raising=False)
    assert main(["--config", write(tmp_path, VALID), "check-config"]) == 2
    assert "NOTIFIER_CALLBACK_TOKEN: unset while NOTIFIER_API_TOKEN is set" in capsys.readouterr().err
    monkeypatch.setenv("NOTIFIER_CALLBACK_TOKEN", "callback-token-0123")
    assert main(["--config", write(tmp_path, VALID), "check-config"]) == 0


def test_a_config_file_not_in_utf8_names_the_file(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    # Saved as GBK (a zh-CN Windows editor), the usual Chinese sign_name in it
    path = write(tmp_path, VALID.replace("channels:\n", "channels:\n  # 签名: 运维告警\n").encode("gbk"))
    code = main(["--config", path, "check-config"])
    err = capsys.readouterr().err
    assert code == 2 and re.fullmatch(rf"notifier: {re.escape(path)}: not UTF-8 text \(byte \d+\): "
                                      r"save it as UTF-8\n", err), err


def test_a_yaml_error_names_the_place_but_does_not_quote_the_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, VALID + 'redis_url: "redis://:pa55word@db:6379\n')  # unclosed quote
    code = main(["--config", path, "check-config"])
    err = capsys.readouterr().err
    assert code == 2 and f"{path}: not valid YAML: " in err and "line 10" in err, err
    assert "pa55word" not in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("label", ["severity", "=critical"])
def test_send_with_a_label_not_key_equals_value_is_a_usage_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], label: str) -> None:
    path = write(tmp_path, VALID)
    with pytest.raises(SystemExit) as exited:  # argparse's usage error, before any Redis
        main(["--config", path, "send", "--title", "DiskFull", "--label", label])
    err = capsys.readouterr().err
    assert exited.value.code == 2
    assert f"argument --label: expected KEY=VALUE, got {label!r}" in err, err


@pytest.mark.parametrize(("text", "problem"), [
    ("channels:\n  sms: {provider: sandbox\n", "not valid YAML: while parsing a flow mapping"),
    ("- just\n- a list\n", "expected a mapping at the top level"),
    ("channels: [sms, email]\n", "channels: expected a mapping"),
])
def test_up_with_a_broken_config_file_is_one_line_naming_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        text: str, problem: str) -> None:
    monkeypatch.chdir(tmp_path)  # `up` keeps its state in ./.notifier
    path = write(tmp_path, text)
    code = main(["--config", path, "up", "--sandbox"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"notifier: {path}: {problem}"), err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / ".notifier").exists()  # refused before anything started


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://:s3cret@db:6379/0", "redis://:***@db:6379/0"),
    ("rediss://user:s3cret@db/1", "rediss://user:***@db/1"),
    ("redis://localhost:6379/0", "redis://localhost:6379/0"),
    ("sentinel://:s3cret@s1:26379;sentinel://s2:26379", "sentinel://:***@s1:26379;sentinel://s2:26379"),
])
def test_redis_urls_are_printed_without_their_password(url: str, shown: str) -> None:
    assert redacted(url) == shown


@pytest.mark.parametrize("action", ["replay", "drop"])
def test_deadletters_replay_or_drop_without_a_transaction_says_so(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], action: str) -> None:
    code = main(["--config", write(tmp_path, VALID), "deadletters", action])
    assert code == 2 and "name the transaction (TXID)" in capsys.readouterr().err


def test_a_claim_lease_shorter_than_a_send_may_take_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A claim that lapses while its send runs is taken over by another worker, which on email
    # or push (no look-up) sends the message again: one page becomes two.
    short = write(tmp_path, VALID + "claim_lease: 30s\n")
    for command in ("check-config", "worker", "scheduler"):
        assert main(["--config", short, command]) == 2
        err = capsys.readouterr().err
        assert "claim_lease: shorter than the worker's task time limit (30s < 60s" in err, command
    assert main(["--config", write(tmp_path, VALID + "claim_lease: 60s\n"), "check-config"]) == 0


def test_the_claim_lease_check_reads_the_workers_task_time_limit(tmp_path: Path) -> None:
    # The limit is the worker's environment's, so check-config (run by systemd with that same
    # environment) must read it there: 30 s is fine for workers limited to 20 s.
    short = write(tmp_path, VALID + "claim_lease: 30s\n")
    env = clean_env(NOTIFIER_TASK_TIME_LIMIT="20")
    checked = subprocess.run([sys.executable, "-m", "notifier", "--config", short, "check-config"],
                             capture_output=True, text=True, env=env, timeout=60, check=False)
    assert checked.returncode == 0, checked.stderr
