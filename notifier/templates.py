"""Rendering of every outgoing message: Jinja2 in a sandbox, event text only ever as data.

Files live in ``templates/{channel}/{kind}.{locale}.{ext}`` (ext ``j2`` for sms and push,
``txt.j2`` + ``html.j2`` for email); a kind without a template of its own falls back to
``alert`` and a locale without one to ``en``. Top-level Jinja blocks carry meaning: for SMS
each block is one Aliyun TemplateParam variable, for push and email the ``subject`` block is
the title and everything else the body. ``templates/README.md`` is the operator's reference.
"""

from __future__ import annotations

import os
import re
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from jinja2 import FileSystemLoader, StrictUndefined, Template, TemplateError, TemplateNotFound
from jinja2 import TemplateSyntaxError as _SyntaxError
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment

from notifier.errors import ConfigError, PermanentError
from notifier.models import Alert, Event, Rendered

DEFAULT_TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "templates"
DEFAULT_LOCALE = "en"
FALLBACK_KIND = "alert"
ELLIPSIS = "…"
_EXTENSIONS: dict[str, tuple[str, ...]] = {
    "sms": ("j2",),
    "push": ("j2",),
    "email": ("txt.j2", "html.j2"),
}
# Kinds and locales become file names: anything else (a path, a dot, a leading underscore
# that names a partial) is treated as "no such template" and falls back.
_KIND = re.compile(r"[a-z][a-z0-9_-]{0,63}")
_LOCALE = re.compile(r"([A-Za-z]{2,3})(?:[-_]([A-Za-z0-9]{2,8}))?")
# C0/C1 controls (tab and newline are handled separately) and the bidi overrides/isolates that
# can make a label value render as something else ("Trojan Source" spoofing).
_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_URL = re.compile(r"(?i)\b(?:https?://|www\.)\S+")
_TIMESTAMP = re.compile(r"(\d{4}-\d{2}-\d{2})[T ](\d{2}:\d{2}:\d{2})(?:\.\d+)?(Z|[+-]\d{2}:\d{2})?")
_SEVERITY_RANK = {"critical": 0, "page": 0, "error": 1, "high": 1, "warning": 2, "warn": 2}
_ERROR_REASON_MAX = 200

BlockHook = Callable[[str, str], str]


@dataclass(frozen=True)
class TemplateContext:
    """Everything a message is rendered from."""

    event: Event
    transaction_id: str
    recipient: str  # recipient name
    locale: str  # "en" | "zh-CN"
    digest: tuple[Event, ...] = ()  # kind "digest": the merged events (storm protection)


def text_units(text: str) -> int:
    """Length as SMS gateways count it: one per character (a Chinese character is one), two for
    characters outside the BMP, which Java-based gateways see as a UTF-16 surrogate pair."""
    return len(text) + sum(1 for ch in text if ord(ch) > 0xFFFF)


def clip(text: str, limit: int) -> str:
    """Cut `text` to at most `limit` units, ending in an ellipsis when cut. 0 means no limit."""
    if limit <= 0 or text_units(text) <= limit:
        return text
    kept: list[str] = []
    used = 1  # the ellipsis
    for ch in text:
        used += 2 if ord(ch) > 0xFFFF else 1
        if used > limit:
            break
        kept.append(ch)
    return "".join(kept).rstrip() + ELLIPSIS


def one_line(text: str) -> str:
    """Subjects, titles and SMS values: no controls, whitespace runs (newlines too) as one space."""
    return re.sub(r"\s+", " ", _CONTROLS.sub("", text)).strip()


def multi_line(text: str) -> str:
    """Plain bodies: no controls, no trailing blanks, at most one empty line in a row."""
    text = _CONTROLS.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def sms_value(text: str, limit: int) -> str:
    """One Aliyun TemplateParam value. Aliyun rejects variables carrying links
    (isv.PARAM_NOT_SUPPORT_URL) and 【】 reads as a forged signature, so both are neutralised."""
    text = _URL.sub("", one_line(text)).replace("【", "[").replace("】", "]")
    return clip(re.sub(r"\s+", " ", text).strip(), limit)


def _timefmt(value: object, offset_hours: float = 0) -> str:
    """Template filter: RFC 3339 (nanoseconds allowed) -> 'YYYY-MM-DD HH:MM:SS' at UTC+offset.
    Alertmanager's zero time (a firing alert's endsAt) becomes ''."""
    raw = str(value)
    match = _TIMESTAMP.fullmatch(raw.strip())
    if not match:
        return raw
    day, clock, zone = match.groups()
    if day.startswith("0001-"):
        return ""
    stamp = datetime.fromisoformat(f"{day}T{clock}{'+00:00' if zone in (None, 'Z') else zone}")
    return stamp.astimezone(timezone(timedelta(hours=offset_hours))).strftime("%Y-%m-%d %H:%M:%S")


def _clip_filter(value: object, limit: int) -> str:
    return clip(str(value), limit)


def _web_url(url: str) -> str:
    """Only http(s) links reach a template: a `javascript:` generatorURL must never be an href."""
    return url if re.match(r"(?i)https?://[^\s\"'<>]+$", url) else ""


def _worst_severity(severities: list[str]) -> str:
    return min(severities, key=lambda s: _SEVERITY_RANK.get(s.lower(), 3), default="info")


def _alert_view(alert: Alert) -> dict[str, Any]:
    notes = alert.annotations
    summary = notes.get("summary") or notes.get("description") or notes.get("message") or ""
    return {
        "status": alert.status or "firing",
        "name": alert.labels.get("alertname", ""),
        "labels": dict(sorted(alert.labels.items())),
        "annotations": dict(notes),
        "summary": summary,
        "description": notes.get("description", ""),
        "starts_at": alert.starts_at,
        "ends_at": "" if alert.ends_at.startswith("0001-") else alert.ends_at,
        "generator_url": _web_url(alert.generator_url),
        "runbook_url": _web_url(notes.get("runbook_url", "")),
        "fingerprint": alert.fingerprint,
    }


def _digest_view(events: tuple[Event, ...]) -> dict[str, Any]:
    groups: dict[str, int] = {}
    for event in events:
        groups[event.title] = groups.get(event.title, 0) + 1
    ranked = sorted(groups.items(), key=lambda item: -item[1])  # stable: first seen wins ties
    return {
        "digest": [
            {"title": e.title, "severity": e.severity, "kind": e.kind, "alerts": len(e.alerts)}
            for e in events
        ],
        "digest_count": len(events),
        "digest_groups": [{"title": title, "count": n} for title, n in ranked],
        "digest_severity": _worst_severity([e.severity for e in events]),
    }


def template_vars(ctx: TemplateContext) -> dict[str, Any]:
    """The variables every template sees (documented in templates/README.md)."""
    event = ctx.event
    alerts = [_alert_view(a) for a in event.alerts]
    first_summary = next((a["summary"] for a in alerts if a["summary"]), "")
    data: dict[str, Any] = {
        "event": event,
        "kind": event.kind,
        "title": event.title,
        "body": event.body,
        "severity": event.severity or "info",
        "status": "resolved" if event.kind == "resolved" else "firing",
        "labels": dict(sorted(event.labels.items())),
        "annotations": dict(event.annotations),
        "extra": dict(event.extra),
        "alerts": alerts,
        "count": max(len(alerts) + event.truncated_alerts, 1),
        "truncated": event.truncated_alerts,
        "firing_count": sum(1 for a in alerts if a["status"] != "resolved"),
        "resolved_count": sum(1 for a in alerts if a["status"] == "resolved"),
        "summary": event.annotations.get("summary") or first_summary or event.body
        or event.annotations.get("description", ""),
        "external_url": _web_url(event.external_url),
        "transaction_id": ctx.transaction_id,
        "recipient": ctx.recipient,
        "locale": ctx.locale,
        "drill_name": event.extra.get("drill_name") or event.title,
        "phase": event.extra.get("phase", ""),
        **_digest_view(ctx.digest or (event,)),
    }
    # Only when present, so that a drill template without a code fails loudly (StrictUndefined)
    # instead of sending an SMS nobody can confirm.
    if "reply_code" in event.extra:
        data["reply_code"] = event.extra["reply_code"]
    return data


def _normalise_locale(locale: str) -> str | None:
    match = _LOCALE.fullmatch(locale.strip())
    if not match:
        return None
    language, region = match.groups()
    if region is None:
        return language.lower()
    return f"{language.lower()}-{region.upper() if len(region) == 2 else region}"


def _autoescape(name: str | None) -> bool:
    return name is not None and name.endswith(".html.j2")


class Renderer:
    """Renders messages from the template directory; safe to share between threads."""

    def __init__(self, template_dir: Path | None = None) -> None:
        env_dir = os.environ.get("NOTIFIER_TEMPLATES")
        directory = template_dir or (Path(env_dir) if env_dir else DEFAULT_TEMPLATE_DIR)
        if not directory.is_dir():
            raise ConfigError(f"templates: {directory} is not a directory")
        self.template_dir = directory.resolve()
        self._env = ImmutableSandboxedEnvironment(
            loader=FileSystemLoader(self.template_dir),
            undefined=StrictUndefined,
            autoescape=_autoescape,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self._env.filters["clip"] = _clip_filter
        self._env.filters["timefmt"] = _timefmt

    def render(
        self,
        channel: str,
        ctx: TemplateContext,
        *,
        param_max_chars: int = 35,
        body_maxlen: int = 0,
        title_maxlen: int = 0,
    ) -> Rendered:
        if channel not in _EXTENSIONS:
            raise PermanentError("template", f"no templates for channel {channel!r}")
        data = template_vars(ctx)
        if channel == "sms":
            params: dict[str, str] = {}

            def to_param(name: str, output: str) -> str:
                params[name] = sms_value(output, param_max_chars)
                return params[name]

            # The preview is the whole template with each block replaced by its cut value, so it
            # reads like the SMS the console template will produce (minus Aliyun's 【signature】).
            preview, _ = self._render(channel, ctx, "j2", data, to_param)
            return Rendered(text=clip(one_line(preview), body_maxlen), params=params)

        def drop_subject(name: str, output: str) -> str:
            return "" if name == "subject" else output

        ext = _EXTENSIONS[channel][0]
        body, blocks = self._render(channel, ctx, ext, data, drop_subject)
        subject = clip(one_line(blocks.get("subject") or ctx.event.title), title_maxlen)
        text = clip(multi_line(body), body_maxlen)
        if channel == "push":
            return Rendered(subject=subject, text=text)
        html, _ = self._render(channel, ctx, "html.j2", {**data, "subject": subject}, None)
        # No cutting here: a cut would break the markup; body_maxlen bounds the text part.
        return Rendered(subject=subject, text=text, html=_CONTROLS.sub("", html).strip())

    def check(self) -> list[str]:
        """Compile every template; one line per problem (for `notifier check-config`)."""
        problems: list[str] = []
        for name in self._env.list_templates(filter_func=lambda n: n.endswith(".j2")):
            try:
                self._env.get_template(name)
            except TemplateError as exc:
                problems.append(str(self._error(name, exc)))
        return problems

    def _candidates(self, channel: str, kind: str, locale: str, ext: str) -> Iterator[str]:
        kinds = [k for k in (kind, FALLBACK_KIND) if _KIND.fullmatch(k)]
        wanted = _normalise_locale(locale)
        locales = [loc for loc in (wanted, DEFAULT_LOCALE) if loc]
        for k in dict.fromkeys(kinds):
            for loc in dict.fromkeys(locales):
                yield f"{channel}/{k}.{loc}.{ext}"

    def _render(
        self,
        channel: str,
        ctx: TemplateContext,
        ext: str,
        data: dict[str, Any],
        hook: BlockHook | None,
    ) -> tuple[str, dict[str, str]]:
        """Render the first template found; return its output and its top-level blocks' output.

        `hook(name, output)` sees each top-level block's output and returns what the template
        emits in its place; nested blocks stay part of the block that encloses them.
        """
        name = f"{channel}/*.{ext}"
        try:
            template = self._find(channel, ctx, ext)
            name = template.name or name
            context = template.new_context(data)
            blocks: dict[str, str] = {}
            if hook is not None:
                depth = [0]
                for block_name, stack in context.blocks.items():
                    stack[0] = _capture(block_name, stack[0], hook, blocks, depth)
            try:
                return "".join(template.root_render_func(context)), blocks
            except Exception:
                self._env.handle_exception()  # re-raises with template file/line frames
        except PermanentError:
            raise
        except Exception as exc:
            # `from None`: the cause's message may quote event data; ours names only the template.
            raise self._error(name, exc) from None

    def _find(self, channel: str, ctx: TemplateContext, ext: str) -> Template:
        for candidate in self._candidates(channel, ctx.event.kind, ctx.locale, ext):
            try:
                return self._env.get_template(candidate)
            except TemplateNotFound as exc:
                if exc.name != candidate:  # an include inside it is missing: a real error
                    raise
        # Names only what was tried: an unusable kind/locale (event data) never makes it in.
        tried = ", ".join(self._candidates(channel, ctx.event.kind, ctx.locale, ext))
        raise PermanentError("template", f"{channel}: no template found (tried {tried})")

    def _error(self, name: str, exc: Exception) -> PermanentError:
        where = name
        if isinstance(exc, _SyntaxError):
            where = f"{exc.name or name} line {exc.lineno}"
        else:
            root = str(self.template_dir)
            trace = traceback.extract_tb(exc.__traceback__)
            frames = [f for f in trace if f.filename.startswith(root)]
            if frames:
                relative = Path(frames[-1].filename).relative_to(self.template_dir).as_posix()
                where = f"{relative} line {frames[-1].lineno}"
        if isinstance(exc, TemplateError):
            reason = f"{type(exc).__name__}: {exc.message or ''}"
        else:
            # Python's own messages (int('...'), KeyError(...)) may quote label values.
            reason = f"{type(exc).__name__} raised while rendering"
        return PermanentError("template", f"{where}: {clip(reason, _ERROR_REASON_MAX)}")


def _capture(
    name: str,
    block: Callable[..., Iterator[str]],
    hook: BlockHook,
    blocks: dict[str, str],
    depth: list[int],
) -> Callable[..., Iterator[str]]:
    """Wrap a compiled block function: Jinja calls `context.blocks[name][0](context)`."""

    def run(context: Context, *args: Any, **kwargs: Any) -> Iterator[str]:
        depth[0] += 1
        try:
            output = "".join(block(context, *args, **kwargs))
        finally:
            depth[0] -= 1
        if depth[0]:
            yield output
            return
        blocks[name] = output
        yield hook(name, output)

    return run


__all__ = ["Renderer", "TemplateContext", "clip", "sms_value", "template_vars", "text_units"]
