"""Label text is data in every template, also where it passes through a shared plain-text
macro (templates/_lib) on its way into an HTML email."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from notifier.schemas import AlertmanagerWebhook
from notifier.sources import from_alertmanager
from notifier.templates import Renderer, TemplateContext

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
LINK = '<a href="https://evil.example/login">Re-authenticate</a>'


def hostile_webhook(name: str) -> AlertmanagerWebhook:
    """A captured webhook whose `severity` label (any alert rule can set it) is HTML."""
    payload = json.loads((FIXTURES / name).read_text(encoding="utf-8"))
    payload["commonLabels"]["severity"] = LINK
    for alert in payload["alerts"]:
        alert["labels"]["severity"] = LINK
    return AlertmanagerWebhook.model_validate(payload)


@pytest.mark.parametrize("locale", ["en", "zh-CN"])
@pytest.mark.parametrize("fixture", ["alertmanager-firing.json", "alertmanager-resolved.json"])
def test_severity_label_cannot_put_markup_into_the_email(locale: str, fixture: str) -> None:
    event = from_alertmanager(hostile_webhook(fixture))
    renderer = Renderer()
    for digest in ((), (event, event)):
        out = renderer.render("email", TemplateContext(event, "tx-1", "alice", locale, digest))
        assert out.html is not None
        # Upper-cased (en) or as sent (zh-CN): either way a live link in the mail, before the fix.
        assert '<a href="https://evil.example' not in out.html.lower(), out.html
        assert "&lt;" in out.html  # shown, escaped
        # The text part is not HTML: the label shows as sent, not as entities.
        assert "&lt;" not in out.text and "&amp;" not in out.text


def test_severity_label_stays_plain_text_in_sms_and_push() -> None:
    event = from_alertmanager(hostile_webhook("alertmanager-firing.json"))
    renderer = Renderer()
    push = renderer.render("push", TemplateContext(event, "tx-1", "alice", "en"))
    assert '<A HREF="HTTPS://EVIL.EXAMPLE/LOGIN">' in push.subject  # data, unescaped in text
    sms = renderer.render("sms", TemplateContext(event, "tx-1", "alice", "en"))
    assert "&lt;" not in sms.params["severity"]


def test_a_text_macro_in_an_operators_own_templates_is_escaped_in_html(tmp_path: Path) -> None:
    """NOTIFIER_TEMPLATES may point at an operator's copy of the templates: any plain-text
    macro they call from HTML is escaped there, not only the shipped severity_label."""
    (tmp_path / "_lib").mkdir()
    (tmp_path / "email").mkdir()
    (tmp_path / "_lib" / "words.j2").write_text(
        "{% macro shout(v) %}{{ v | upper }}!{% endmacro %}", encoding="utf-8")
    (tmp_path / "email" / "alert.en.txt.j2").write_text(
        '{% from "_lib/words.j2" import shout %}{{ shout(title) }}', encoding="utf-8")
    (tmp_path / "email" / "alert.en.html.j2").write_text(
        '{% from "_lib/words.j2" import shout %}<p>{{ shout(title) }}</p>'
        '<p>{{ shout(title) ~ " " ~ title }}</p>', encoding="utf-8")
    event = from_alertmanager(hostile_webhook("alertmanager-firing.json"))
    event = dataclasses.replace(event, title=LINK)
    out = Renderer(tmp_path).render("email", TemplateContext(event, "tx-1", "alice", "en"))
    assert out.html is not None and "<A HREF" not in out.html and "<a href" not in out.html
    assert out.html.count("&lt;A HREF=") == 2 and out.html.count("&lt;a href=") == 1
    assert out.text == LINK.upper() + "!"
