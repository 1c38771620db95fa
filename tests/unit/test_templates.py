"""Rendering: every fixture in every channel and locale, inert label text, sandbox, fallbacks."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import pytest

from notifier.errors import PermanentError
from notifier.models import Alert, Event, Rendered
from notifier.template_vars import timefmt
from notifier.templates import Renderer, TemplateContext, clip, text_units

# Captured payloads live beside the repo (../shared/fixtures); a copy in tests/fixtures wins.
_HERE = Path(__file__).resolve()
FIXTURES = next(
    (
        d
        for d in (_HERE.parents[1] / "fixtures", _HERE.parents[3] / "shared" / "fixtures")
        if d.is_dir()
    ),
    _HERE.parents[3] / "shared" / "fixtures",
)
AM_FIXTURES = sorted(p.name for p in FIXTURES.glob("alertmanager-*.json"))
LOCALES = ("en", "zh-CN")
CHANNELS = ("sms", "email", "push")
HOSTILE = "<script>alert(1)</script>"
SMS_SEGMENT = 70  # one Aliyun SMS, signature included
SIGN = "【运维告警】"


def event_from_alertmanager(payload: dict[str, Any]) -> Event:
    """What an Alertmanager adapter builds from a webhook v4 body."""
    common = payload.get("commonLabels", {})
    annotations = payload.get("commonAnnotations", {})
    return Event(
        kind="resolved" if payload["status"] == "resolved" else "alert",
        title=common.get("alertname") or payload.get("groupKey", "alerts"),
        body=annotations.get("summary", ""),
        severity=common.get("severity", "warning"),
        labels=common,
        annotations=annotations,
        alerts=tuple(
            Alert(
                status=a["status"],
                labels=a["labels"],
                annotations=a["annotations"],
                starts_at=a["startsAt"],
                ends_at=a["endsAt"],
                generator_url=a["generatorURL"],
                fingerprint=a["fingerprint"],
            )
            for a in payload["alerts"]
        ),
        truncated_alerts=int(payload.get("truncatedAlerts", 0)),
        external_url=payload.get("externalURL", ""),
    )


def fixture_event(name: str) -> Event:
    return event_from_alertmanager(json.loads((FIXTURES / name).read_text(encoding="utf-8")))


def ctx(event: Event, locale: str = "en", digest: tuple[Event, ...] = ()) -> TemplateContext:
    return TemplateContext(event, "tx-0001", "alice", locale, digest)


def all_text(r: Rendered) -> str:
    return "\n".join([r.subject, r.text, r.html or "", *r.params.values()])


@pytest.fixture(scope="module")
def renderer() -> Renderer:
    return Renderer()


def hostile_dir(tmp_path: Path, sms_source: str) -> Path:
    (tmp_path / "sms").mkdir()
    (tmp_path / "sms" / "alert.en.j2").write_text(sms_source, encoding="utf-8")
    return tmp_path


def test_fixtures_are_there() -> None:
    assert len(AM_FIXTURES) >= 3


@pytest.mark.parametrize("name", AM_FIXTURES)
@pytest.mark.parametrize("locale", LOCALES)
@pytest.mark.parametrize("channel", CHANNELS)
def test_every_fixture_renders(renderer: Renderer, name: str, locale: str, channel: str) -> None:
    event = fixture_event(name)
    out = renderer.render(channel, ctx(event, locale))
    assert out.text
    if channel == "sms":
        assert set(out.params) == {"severity", "title", "content"}
        assert all(out.params.values())
        assert all(text_units(v) <= 35 for v in out.params.values())
        assert text_units(SIGN + out.text) <= SMS_SEGMENT, out.text
    else:
        assert event.title in out.subject
    if channel == "email":
        assert out.html is not None and out.html.startswith("<!DOCTYPE html>")
        assert "tx-0001" in out.text
        assert "http://vm:19193" in out.text and 'href="http://vm:19193"' in out.html
    assert "\x1b" not in all_text(out)


@pytest.mark.parametrize(("value", "offset", "shown"), [
    ("2026-11-23T03:45:06.123456789Z", 8, "2026-11-23 11:45:06"),
    ("0001-01-01T00:00:00Z", 0, ""),
    ("soon", 0, "soon"),
    ("2026-13-01T03:45:06Z", 0, "2026-13-01T03:45:06Z"),       # month 13
    ("2026-11-23T25:00:00Z", 0, "2026-11-23T25:00:00Z"),       # hour 25
    ("0000-01-01T00:00:00Z", 0, "0000-01-01T00:00:00Z"),       # year 0
    ("2026-11-23T03:45:06+99:00", 0, "2026-11-23T03:45:06+99:00"),  # offset out of range
    ("9999-12-31T23:59:59Z", 8, "9999-12-31T23:59:59Z"),       # UTC+8 runs past year 9999
])
def test_timefmt_shows_what_is_not_a_time_as_given(value: str, offset: int, shown: str) -> None:
    assert timefmt(value, offset) == shown


@pytest.mark.parametrize("locale", LOCALES)
def test_an_alert_with_an_impossible_start_time_still_renders_as_email(renderer: Renderer,
                                                                        locale: str) -> None:
    event = fixture_event("alertmanager-firing.json")
    first = dataclasses.replace(event.alerts[0], starts_at="2026-13-01T03:45:06Z")
    out = renderer.render("email", ctx(dataclasses.replace(event, alerts=(first, *event.alerts[1:])),
                                       locale))
    assert "2026-13-01T03:45:06Z" in out.text and out.html is not None


@pytest.mark.parametrize("locale", LOCALES)
def test_label_text_is_inert(renderer: Renderer, locale: str) -> None:
    event = fixture_event("alertmanager-firing.json")
    email = renderer.render("email", ctx(event, locale))
    push = renderer.render("push", ctx(event, locale))
    sms = renderer.render("sms", ctx(event, locale))
    assert email.html is not None
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in email.html
    assert "<script>" not in email.html
    assert HOSTILE in email.text and HOSTILE in push.text
    assert "<script>" in sms.params["content"]  # cut to 35 chars, but literal
    for out in (email, push):
        assert "{{ 7*7 }}" in out.text
    assert "{{ 7*7 }}" in (email.html or "")
    for out in (email, push, sms):
        # 49 would be the expression evaluated; "03:49:41" (startsAt) is fine.
        assert not re.search(r"(?<![\d:])49(?![\d:])", all_text(out))


@pytest.mark.parametrize("locale", LOCALES)
@pytest.mark.parametrize("channel", CHANNELS)
def test_resolved_reads_as_resolved(renderer: Renderer, locale: str, channel: str) -> None:
    firing = renderer.render(channel, ctx(fixture_event("alertmanager-firing.json"), locale))
    resolved = renderer.render(channel, ctx(fixture_event("alertmanager-resolved.json"), locale))
    word = "RESOLVED" if locale == "en" else "已恢复"
    assert word in resolved.text
    assert word not in firing.text
    assert resolved.subject != firing.subject or resolved.text != firing.text


def test_truncated_group_counts_and_says_more(renderer: Renderer) -> None:
    event = fixture_event("alertmanager-critical-truncated.json")
    email = renderer.render("email", ctx(event))
    assert "[FIRING:3]" in email.subject
    assert "1 more not shown" in email.text and "1 more not shown" in (email.html or "")
    assert "磁盘 /data 使用率 97%" in email.text and "磁盘 /data 使用率 95%" in email.text
    assert "http://prometheus:9090/graph?g0.expr=disk" in (email.html or "")
    zh = renderer.render("sms", ctx(event, "zh-CN"))
    assert zh.params == {
        "severity": "严重",
        "title": "DiskFull 等3条",
        "content": "磁盘 /data 使用率 97%",
    }
    assert zh.text == "告警（严重）：DiskFull 等3条，磁盘 /data 使用率 97%"


@pytest.mark.parametrize("locale", LOCALES)
def test_sms_params_are_cut_per_character(renderer: Renderer, locale: str) -> None:
    summary = "数据库主库磁盘使用率超过阈值" * 5  # 70 Chinese characters
    event = Event(kind="alert", title="磁盘告警" * 20, severity="critical", body=summary)
    out = renderer.render("sms", ctx(event, locale), param_max_chars=12)
    for value in out.params.values():
        assert len(value) <= 12
    assert out.params["content"] == summary[:11] + "…"
    assert out.params["title"].endswith("…")
    assert out.text.startswith("告警（严重）：" if locale == "zh-CN" else "[CRITICAL] ")


def test_clip_counts_characters_not_bytes() -> None:
    assert clip("磁盘使用率", 5) == "磁盘使用率"
    assert clip("磁盘使用率高", 5) == "磁盘使用…"
    assert clip("abc", 0) == "abc"
    assert text_units("😀") == 2  # a surrogate pair to a Java gateway


def test_sms_values_lose_links_controls_and_fake_signatures(renderer: Renderer) -> None:
    body = "\x1b[31mred\n【银行】\u202eok see https://x.io/a"
    out = renderer.render("sms", ctx(Event(kind="alert", title="t\r\nx", body=body)))
    assert out.params["content"] == "[31mred [银行]ok see"
    assert out.params["title"] == "t x"
    push = renderer.render("push", ctx(Event(kind="alert", title="a\x00b", body=body)))
    assert "\x1b" not in push.text and "\u202e" not in push.text and "\x00" not in push.subject


def test_unsafe_links_never_become_hrefs(renderer: Renderer) -> None:
    alert = Alert(
        status="firing",
        labels={"alertname": "X"},
        annotations={"summary": "s"},
        generator_url="javascript:alert(1)",
    )
    event = Event(kind="alert", title="X", alerts=(alert,), external_url="javascript:alert(2)")
    html = renderer.render("email", ctx(event)).html or ""
    assert "javascript:" not in html


def test_hostile_template_is_stopped_by_the_sandbox(tmp_path: Path) -> None:
    r = Renderer(hostile_dir(tmp_path, "{% block title %}{{ ''.__class__.__mro__ }}{% endblock %}"))
    with pytest.raises(PermanentError) as caught:
        r.render("sms", ctx(fixture_event("alertmanager-firing.json")))
    message = str(caught.value)
    assert caught.value.code == "template"
    assert "sms/alert.en.j2 line 1" in message and "SecurityError" in message


def test_missing_variable_is_permanent_and_leaks_no_event_data(tmp_path: Path) -> None:
    source = (
        "{% block title %}{{ summary }}{% endblock %}\n{% block content %}{{ nope }}{% endblock %}"
    )
    r = Renderer(hostile_dir(tmp_path, source))
    with pytest.raises(PermanentError) as caught:
        r.render("sms", ctx(fixture_event("alertmanager-firing.json")))
    message = str(caught.value)
    assert "sms/alert.en.j2 line 2" in message and "'nope' is undefined" in message
    assert "latency" not in message and "script" not in message
    assert caught.value.__suppress_context__


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        ("{{ {}[summary] }}", "UndefinedError: 'dict object' has no attribute '<data>'"),
        (
            "{{ {}[title ~ '\\n' ~ title] }}",
            r"UndefinedError: 'dict object' has no attribute '<data>\n<data>'",
        ),
        ("{{ summary.index('not there') }}", "ValueError raised while rendering"),
    ],
)
def test_errors_do_not_quote_event_data(tmp_path: Path, source: str, reason: str) -> None:
    r = Renderer(hostile_dir(tmp_path, "{% block title %}" + source + "{% endblock %}"))
    with pytest.raises(PermanentError) as caught:
        r.render("sms", ctx(fixture_event("alertmanager-firing.json")))
    assert str(caught.value) == f"template: sms/alert.en.j2 line 1: {reason}"


def test_syntax_error_and_missing_templates_are_permanent(tmp_path: Path) -> None:
    r = Renderer(hostile_dir(tmp_path, "{% block title %}{{ oops {% endblock %}"))
    assert r.check() and "sms/alert.en.j2 line 1" in r.check()[0]
    with pytest.raises(PermanentError, match=r"sms/alert\.en\.j2 line 1"):
        r.render("sms", ctx(Event(kind="alert", title="t")))
    with pytest.raises(PermanentError, match="no template found"):
        r.render("push", ctx(Event(kind="alert", title="t")))
    with pytest.raises(PermanentError, match="no templates for channel"):
        r.render("fax", ctx(Event(kind="alert", title="t")))


def test_shipped_templates_compile(renderer: Renderer) -> None:
    assert renderer.check() == []


@pytest.mark.parametrize("kind", ["test", "no-such-kind", "../../etc/passwd", "_alerts"])
def test_missing_kind_falls_back_to_alert(renderer: Renderer, kind: str) -> None:
    event = Event(kind=kind, title="DiskFull", severity="critical", body="disk 97%")
    out = renderer.render("sms", ctx(event))
    assert set(out.params) == {"severity", "title", "content"}
    assert out.params["content"] == "disk 97%"
    email = renderer.render("email", ctx(event, "zh-CN"))
    assert "DiskFull" in email.subject and "disk 97%" in email.text


def test_test_kind_is_marked_as_test(renderer: Renderer) -> None:
    event = Event(kind="test", title="Hello", body="ping")
    assert renderer.render("email", ctx(event)).subject.startswith("[TEST]")
    assert renderer.render("sms", ctx(event, "zh-CN")).params["severity"].startswith("测试")


@pytest.mark.parametrize("locale", ["fr", "de-DE", "zh-TW", "", "../x"])
def test_missing_locale_falls_back_to_en(renderer: Renderer, locale: str) -> None:
    out = renderer.render("push", ctx(fixture_event("alertmanager-firing.json"), locale))
    assert out.subject == "[WARNING] HighLatency"


def test_locale_spelling_is_normalised(renderer: Renderer) -> None:
    out = renderer.render("push", ctx(fixture_event("alertmanager-firing.json"), "zh_cn"))
    assert out.subject == "【警告】HighLatency"


@pytest.mark.parametrize("locale", LOCALES)
def test_digest_of_40_fits_one_sms(renderer: Renderer, locale: str) -> None:
    names = ["DiskFull"] * 22 + ["HighLatency"] * 12 + ["NodeDown"] * 6
    events = tuple(
        Event(kind="alert", title=n, severity="critical" if n == "NodeDown" else "warning")
        for n in names
    )
    digest = Event(kind="digest", title="storm", severity="critical")
    out = renderer.render("sms", ctx(digest, locale, events))
    assert set(out.params) == {"severity", "title", "content"}
    assert "40" in out.params["title"]
    assert out.params["content"].startswith("DiskFull×22 HighLatency×12")
    assert all(text_units(v) <= 35 for v in out.params.values())
    assert text_units(SIGN + out.text) <= SMS_SEGMENT, out.text
    assert out.params["severity"] == ("CRITICAL" if locale == "en" else "严重")
    email = renderer.render("email", ctx(digest, locale, events))
    assert "40" in email.subject and "22 × DiskFull" in email.text
    push = renderer.render("push", ctx(digest, locale, events))
    assert "40" in push.subject and "NodeDown ×6" in push.text


@pytest.mark.parametrize("locale", LOCALES)
def test_drill_carries_the_reply_code(renderer: Renderer, locale: str) -> None:
    event = Event(
        kind="drill",
        title="DR 2026Q4",
        body="switching DB to standby",
        extra={"reply_code": "4721", "phase": "phase 2", "deadline": "12:00"},
    )
    sms = renderer.render("sms", ctx(event, locale))
    assert sms.params["code"] == "4721"
    assert set(sms.params) == {"title", "content", "code"}
    assert "4721" in sms.text and "DR 2026Q4" in sms.params["title"]
    assert text_units(SIGN + sms.text) <= SMS_SEGMENT
    for channel in ("email", "push"):
        out = renderer.render(channel, ctx(event, locale))
        assert "4721" in out.text and "DR 2026Q4" in out.subject
    assert "deadline" in renderer.render("email", ctx(event, locale)).text


def test_drill_without_reply_code_fails_loudly(renderer: Renderer) -> None:
    with pytest.raises(PermanentError, match="reply_code"):
        renderer.render("sms", ctx(Event(kind="drill", title="DR")))


@pytest.mark.parametrize("kind", ["alert", "resolved", "drill", "digest"])
def test_sms_variables_match_across_locales(renderer: Renderer, kind: str) -> None:
    """One Aliyun TemplateCode per kind serves both languages: the variable names must agree."""
    event = Event(kind=kind, title="X", body="y", extra={"reply_code": "1234"})
    en, zh = (renderer.render("sms", ctx(event, loc)).params for loc in LOCALES)
    assert list(en) == list(zh)


def test_lengths_are_cut_for_push_and_email(renderer: Renderer) -> None:
    event = Event(kind="alert", title="T" * 100, body="b" * 1000)
    push = renderer.render("push", ctx(event), body_maxlen=50, title_maxlen=20)
    assert len(push.subject) == 20 and push.subject.endswith("…")
    assert len(push.text) <= 50 and push.text.endswith("…")
    sms = renderer.render("sms", ctx(event), body_maxlen=30)
    assert len(sms.text) <= 30


def test_template_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hostile_dir(tmp_path, "{% block only %}{{ title }}{% endblock %}!")
    monkeypatch.setenv("NOTIFIER_TEMPLATES", str(tmp_path))
    out = Renderer().render("sms", ctx(Event(kind="alert", title="hi")))
    assert out.params == {"only": "hi"} and out.text == "hi!"


def test_nested_blocks_belong_to_their_parent(tmp_path: Path) -> None:
    source = "{% block a %}<{% block b %}{{ title }}{% endblock %}>{% endblock %}"
    out = Renderer(hostile_dir(tmp_path, source)).render("sms", ctx(Event(kind="alert", title="x")))
    assert out.params == {"a": "<x>"}


@pytest.mark.parametrize("locale", LOCALES)
@pytest.mark.parametrize("kind", ["alert", "resolved", "drill", "digest", "test"])
def test_worst_case_sms_fits_one_segment(renderer: Renderer, locale: str, kind: str) -> None:
    """Long everything: the whole SMS, signature included, still bills as one message."""
    alerts = tuple(
        Alert(status="firing", labels={"alertname": "A"}, annotations={"summary": "x" * 200})
        for _ in range(2)
    )
    event = Event(
        kind=kind,
        title="数据库集群主备切换失败" * 9,
        body="磁盘" * 100,
        severity="catastrophic",
        alerts=alerts,
        truncated_alerts=98,
        extra={"reply_code": "472193", "phase": "第二阶段：切换" * 9},
    )
    digest = tuple(Event(kind="alert", title=f"Alert{i:03d}" * 4) for i in range(999))
    out = renderer.render("sms", ctx(event, locale, digest if kind == "digest" else ()))
    assert text_units(SIGN + out.text) <= SMS_SEGMENT, out.text


def test_merged_events_render_as_digest_whatever_the_event_kind(renderer: Renderer) -> None:
    """The pipeline hands the first merged event as `event` (kind alert) plus the digest."""
    merged = tuple(Event(kind="alert", title=f"A{i % 3}") for i in range(7))
    out = renderer.render("push", ctx(merged[0], "en", merged))
    assert out.subject == "[INFO] 7 alerts"
