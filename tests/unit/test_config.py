"""A bad config names the key and the problem; a good one loads with defaults filled in."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from notifier.config import load_settings, normalise_phone, parse_duration, settings_from_mapping
from notifier.errors import ConfigError

GOOD: dict[str, Any] = {
    "channels": {
        "sms": {"provider": "aliyun", "sign_name": "运维告警", "templates": {"alert": "SMS_1"},
                "rate_limit": {"rate": 50, "per": "1s", "burst": 100}},
        "email": {"provider": "smtp", "sender": "n@example.com"},
    },
    "recipients": {"alice": {"phone": "13800138000", "email": "alice@example.com"}},
    "groups": {"oncall": ["alice"]},
    "routes": [{"match": {"severity": "critical"}, "to": ["oncall"], "channels": ["sms"],
                "fallback": ["email"]}],
}


def with_change(path: str, value: Any) -> dict[str, Any]:
    import copy

    data = copy.deepcopy(GOOD)
    node: Any = data
    parts = path.split(".")
    for part in parts[:-1]:
        node = node[int(part)] if part.isdigit() else node[part]
    last = parts[-1]
    if value is DELETE:
        del node[last]
    elif last.isdigit():
        node[int(last)] = value
    else:
        node[last] = value
    return data


DELETE = object()

BAD_CASES = [
    ("routes.0.channels", ["fax"], "routes[0].channels[0]: unknown channel 'fax'"),
    ("routes.0.to", ["nobody"], "routes[0].to[0]: unknown recipient or group 'nobody'"),
    ("groups.oncall", ["ghost"], "groups.oncall[0]: unknown recipient 'ghost'"),
    ("recipients.alice.phone", "12", "recipients.alice.phone: not a valid phone number"),
    ("recipients.alice.email", "not-an-email", "recipients.alice.email: not an email"),
    ("channels.sms.provider", "smtp", "channels.sms.providers[0]"),
    ("channels.sms.sign_name", DELETE, "channels.sms.providers[0].sign_name: Field required"),
    ("channels.sms.rate_limit.per", "soon", "channels.sms.rate_limit.per: expected a duration"),
    ("channels.sms.rate_limit.rate", 0, "channels.sms.rate_limit.rate"),
    # A bucket refilled over no time at all: every send on the channel raised in the deliver
    # step (no SMS, no fallback, re-queued by the reaper for ever).
    ("channels.sms.rate_limit.per", "0s",
     "channels.sms.rate_limit.per: Input should be greater than 0"),
    # Key lifetimes that round to nothing in Redis: a retention under a second (EXPIRE 0)
    # deleted each transaction as it was accepted (200, then 404, never sent); a dedup window
    # under a millisecond (SET PX 0) or an idempotency TTL under a second (SET EX 0) made the
    # accept script fail: every Alertmanager webhook, or every event with a key, answered 503.
    ("retention", "0.5s", "retention: Input should be greater than or equal to 1"),
    ("dedup_window", "0s", "dedup_window: Input should be greater than or equal to 0.001"),
    ("idempotency_ttl", 0, "idempotency_ttl: Input should be greater than or equal to 1"),
    # A repeat answered "suppressed" with a transaction retention had already deleted.
    ("retention", "1h", "idempotency_ttl: longer than retention (86400s > 3600s)"),
    ("dedup_window", "8d", "dedup_window: longer than retention"),
    # Each listing was a delivery of its own: every alert went to the phone twice.
    ("routes.0.channels", ["sms", "sms"], "routes[0].channels: 'sms' listed twice"),
    ("routes.0.fallback", ["email", "email"], "routes[0].fallback: 'email' listed twice"),
    # Every kind without a template of its own uses 'alert': without it, a firing alert's SMS
    # failed at every send (NoTemplate), and only there.
    ("channels.sms.templates", {"firing": "SMS_1", "resolved": "SMS_2"},
     "channels.sms.providers[0].templates: no 'alert' template"),
    # Each token is a delivery of its own: the device got every alert twice.
    ("recipients.alice.push_tokens", ["tok-1", "tok-1"],
     "recipients.alice.push_tokens: 'tok-1' listed twice"),
    ("redis_url", "localhost:6379", "redis_url: expected a redis://, rediss://, unix://, sentinel:// URL"),
    ("idempotency_ttl", 1e300, "idempotency_ttl: a duration must be at most 3650d"),
    ("channels.sms.rate_limit.burst", 0.5,
     "channels.sms.rate_limit.burst: Input should be greater than or equal to 1"),
    ("channels.email.port", 70000, "channels.email.providers[0].port"),
    ("channels.email.tls", "ssl3", "channels.email.providers[0].tls"),
    ("routes", [], "routes: List should have at least 1 item"),
    ("surprise", 1, "surprise: Extra inputs are not permitted"),
    ("routes.0.match_re", {"x": "("}, "routes[0].match_re: x: bad regex"),
]


@pytest.mark.parametrize(("path", "value", "message"), BAD_CASES)
def test_bad_config_names_key_and_problem(path: str, value: Any, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        settings_from_mapping(with_change(path, value))
    assert message.split(": ", maxsplit=1)[0] in str(err.value)
    assert message.split(": ", 1)[-1] in str(err.value)


def test_good_config_normalises_and_defaults() -> None:
    settings = settings_from_mapping(GOOD)
    assert settings.recipients["alice"].phone == "+8613800138000"
    sms = settings.channels["sms"]
    assert sms.providers[0].name == "aliyun"
    assert sms.rate_limit is not None and sms.rate_limit.capacity == 100
    assert settings.dedup_window == 600 and settings.retention == 7 * 86400


def test_a_slow_rate_banks_one_whole_message() -> None:
    """'rate: 0.5, per: 1s' is one message every two seconds: a bucket of half a token could
    never send one."""
    settings = settings_from_mapping(with_change("channels.sms.rate_limit",
                                                 {"rate": 0.5, "per": "1s"}))
    limit = settings.channels["sms"].rate_limit
    assert limit is not None and limit.capacity == 1 and limit.refill_per_second == 0.5


def test_redis_url_env_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFIER_REDIS_URL", "redis://10.0.0.9:6380/2")
    assert settings_from_mapping(GOOD).redis_url == "redis://10.0.0.9:6380/2"


@pytest.mark.parametrize("url", ["redis://:Xk9/Qz7pw@127.0.0.1:6379/0",  # '/' not encoded
                                 "redis://:s3cretpw@127.0.0.1:63a79/0",
                                 "redis://:s3cretpw@127.0.0.1:99999/0",
                                 "sentinel://:s3cretpw@s1:26379;sentinel://s2:2637x",
                                 "sentinel://:s3cretpw@s1:26379;redis://s2:6379"])
def test_a_redis_url_the_client_cannot_read_is_refused_without_showing_it(url: str) -> None:
    with pytest.raises(ConfigError, match="redis_url: cannot be read") as err:
        settings_from_mapping(with_change("redis_url", url))
    assert "Xk9" not in str(err.value) and "s3cret" not in str(err.value)


def test_a_redis_url_override_is_checked_without_showing_it(monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    monkeypatch.setenv("NOTIFIER_REDIS_URL", "//:s3cret@10.0.0.9:6380/2")
    with pytest.raises(ConfigError, match="NOTIFIER_REDIS_URL: expected a redis://") as err:
        settings_from_mapping(GOOD)
    assert "s3cret" not in str(err.value)


def test_load_settings_reports_yaml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("channels: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(bad)


@pytest.mark.parametrize(("raw", "e164"), [
    ("+8613800138000", "+8613800138000"), ("8613800138000", "+8613800138000"),
    ("13800138000", "+8613800138000"), ("+1 415 555 2671", "+14155552671"),
    # Bare mainland mobiles that would also be valid NANP numbers with a '+' in front.
    ("15012345678", "+8615012345678"), ("17012345678", "+8617012345678"),
    ("16612345678", "+8616612345678"), ("18012345678", "+8618012345678"),
    ("8615012345678", "+8615012345678"),
    # Not valid as mainland numbers: still read as international without the '+'.
    ("14155552671", "+14155552671"), ("85261234567", "+85261234567"),
    ("447911123456", "+447911123456"),
    # As Aliyun writes (and pushes back) numbers abroad: country code + number, no '+'. Each is
    # also a landline's number in mainland China; the mobile abroad is what was texted.
    ("79161234567", "+79161234567"), ("4740612345", "+4740612345"),
])
def test_phone_numbers_normalise_to_e164(raw: str, e164: str) -> None:
    assert normalise_phone(raw) == e164


@pytest.mark.parametrize(("written", "problem"), [
    ("15012345678", "write it as +86… (CN) or +1… (US)"),
    ("1 (650) 253-0000", "write it as +86… (CN) or +1… (US)"),
])
def test_a_configured_number_that_reads_two_ways_must_say_its_country(written: str,
                                                                     problem: str) -> None:
    with pytest.raises(ConfigError, match=r"recipients\.alice\.phone: ambiguous") as err:
        settings_from_mapping(with_change("recipients.alice.phone", written))
    assert problem in str(err.value)


@pytest.mark.parametrize(("written", "e164"), [
    ("13800138000", "+8613800138000"), ("+1 650 253 0000", "+16502530000"),
    ("+86 150 1234 5678", "+8615012345678"), ("7 916 123-45-67", "+79161234567"),
])
def test_a_configured_number_that_reads_one_way_is_taken(written: str, e164: str) -> None:
    settings = settings_from_mapping(with_change("recipients.alice.phone", written))
    assert settings.recipients["alice"].phone == e164


@pytest.mark.parametrize(("raw", "seconds"), [("500ms", 0.5), ("10s", 10), ("5m", 300),
                                               ("2h", 7200), ("7d", 604800), (3, 3.0)])
def test_durations(raw: object, seconds: float) -> None:
    assert parse_duration(raw) == seconds


# JSON's 1e400 reads as inf; 400 digits read as inf too, and an integer of 400 digits (YAML and
# JSON allow one) is past any float.
@pytest.mark.parametrize(("raw", "problem"), [
    (float("inf"), "at most 3650d"), (float("-inf"), "cannot be negative"), (float("nan"), "NaN"),
    ("9" * 400 + "s", "at most 3650d"), (10 ** 400, "at most 3650d"), ("3651d", "at most 3650d"),
], ids=["inf", "-inf", "nan", "400 digits", "400-digit int", "3651d"])
def test_durations_must_be_finite_and_bounded(raw: object, problem: str) -> None:
    with pytest.raises(ValueError, match=problem) as err:
        parse_duration(raw)
    assert "9999" not in str(err.value)  # the value itself is not echoed back
