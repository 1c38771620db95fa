"""Rendering of every outgoing message: Jinja2 in a sandbox, event text only ever as data.

Files live in ``templates/{channel}/{kind}.{locale}.{ext}`` (``j2`` for sms and push, ``txt.j2``
plus ``html.j2`` for email). A kind without a template of its own falls back to ``alert``, a
locale without one to ``en``. Top-level blocks carry meaning: for SMS each block is one Aliyun
TemplateParam variable; for push and email the ``subject`` block is the title and the rest the
body. ``templates/README.md`` is the operator's reference for blocks and variables.
"""

from __future__ import annotations

import os
import re
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from jinja2 import FileSystemLoader, StrictUndefined, Template, TemplateError, TemplateNotFound
from jinja2 import TemplateSyntaxError as _SyntaxError
from jinja2.runtime import Context, Macro
from jinja2.sandbox import ImmutableSandboxedEnvironment

from notifier.errors import ConfigError, PermanentError
from notifier.models import Rendered
from notifier.template_vars import (
    CONTROLS,
    TemplateContext,
    clip,
    event_strings,
    multi_line,
    one_line,
    sms_value,
    template_vars,
    text_units,
    timefmt,
    without_links,
)

__all__ = ["Renderer", "TemplateContext", "clip", "sms_value", "template_vars", "text_units"]

DEFAULT_TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "templates"
DEFAULT_LOCALE = "en"
FALLBACK_KIND = "alert"
_EXTENSIONS = {"sms": "j2", "push": "j2", "email": "txt.j2"}
# Kinds and locales become file names: anything else (a path, a dot, a leading "_" naming a
# partial) is treated as "no such template" and falls back.
_KIND = re.compile(r"[a-z][a-z0-9_-]{0,63}")
_LOCALE = re.compile(r"([A-Za-z]{2,3})(?:[-_]([A-Za-z]{2}|[0-9]{3}))?")
# C0/C1 controls (tab and newline are handled by the callers) and the bidi overrides/isolates
# that make a label value display as something else ("Trojan Source" spoofing).

BlockHook = Callable[[str, str], str]


def _locales(locale: str) -> list[str]:
    match = _LOCALE.fullmatch(locale.strip())
    if not match:
        return [DEFAULT_LOCALE]
    language, region = match.groups()
    wanted = f"{language.lower()}-{region.upper()}" if region else language.lower()
    return list(dict.fromkeys((wanted, DEFAULT_LOCALE)))


class _Environment(ImmutableSandboxedEnvironment):
    """The sandbox, where a macro's output is escaped as its own template's output is.

    Jinja marks what a macro returns as safe markup whenever the calling template autoescapes,
    even when the macro's own template did not escape anything: `{% from "_lib/i18n.j2" import
    severity_label %}` in an *.html.j2 template put a severity label's own markup into the
    email. A macro from a template that is not autoescaped gives the caller a plain str, which
    the caller escapes like any other value."""

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        result = super().call(__context, __obj, *args, **kwargs)
        if isinstance(__obj, Macro) and not __obj._default_autoescape and __context.eval_ctx.autoescape:
            return str(result)
        return result


class Renderer:
    """Renders messages from one template directory; safe to share between threads."""

    def __init__(self, template_dir: Path | None = None) -> None:
        env_dir = os.environ.get("NOTIFIER_TEMPLATES")
        directory = template_dir or (Path(env_dir) if env_dir else DEFAULT_TEMPLATE_DIR)
        if not directory.is_dir():
            raise ConfigError(f"templates: {directory} is not a directory")
        self.template_dir = directory.resolve()
        self._env = _Environment(
            loader=FileSystemLoader(self.template_dir),
            undefined=StrictUndefined,
            autoescape=lambda name: bool(name and name.endswith(".html.j2")),
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self._env.filters["clip"] = lambda value, limit: clip(str(value), limit)
        self._env.filters["timefmt"] = timefmt

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
            # Links go before the templates clip values: a cut "https:…" no longer looks like one.
            data = {k: v if k == "event" else without_links(v) for k, v in data.items()}
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

        body, blocks = self._render(channel, ctx, _EXTENSIONS[channel], data, drop_subject)
        subject = clip(one_line(blocks.get("subject") or ctx.event.title), title_maxlen)
        text = clip(multi_line(body), body_maxlen)
        if channel == "push":
            return Rendered(subject=subject, text=text)
        html, _ = self._render(channel, ctx, "html.j2", {**data, "subject": subject}, None)
        # Not cut: cutting would break the markup. body_maxlen bounds the text part.
        return Rendered(subject=subject, text=text, html=CONTROLS.sub("", html).strip())

    def check(self) -> list[str]:
        """Compile every template; one line per problem (for `notifier check-config`)."""
        problems: list[str] = []
        for name in self._env.list_templates(filter_func=lambda n: n.endswith(".j2")):
            try:
                self._env.get_template(name)
            except TemplateError as exc:
                problems.append(str(self._error(name, exc, [])))
        return problems

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
        emits in its place; nested blocks stay part of the block enclosing them.
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
            # `from None`: the cause may quote event data; ours names only template and reason.
            raise self._error(name, exc, event_strings(ctx)) from None

    def _find(self, channel: str, ctx: TemplateContext, ext: str) -> Template:
        kinds = dict.fromkeys(k for k in (ctx.kind, FALLBACK_KIND) if _KIND.fullmatch(k))
        tried = [f"{channel}/{k}.{loc}.{ext}" for k in kinds for loc in _locales(ctx.locale)]
        for candidate in tried:
            try:
                return self._env.get_template(candidate)
            except TemplateNotFound as exc:
                if exc.name != candidate:  # an import inside it is missing: a real error
                    raise
        # Names only sanitised candidates: an unusable kind/locale (event data) never shows.
        raise PermanentError("template", f"{channel}: no template found (tried {', '.join(tried)})")

    def _error(self, name: str, exc: Exception, redact: list[str]) -> PermanentError:
        where = name
        if isinstance(exc, _SyntaxError):
            where = f"{exc.name or name} line {exc.lineno}"
        else:
            root = str(self.template_dir)
            frames = [
                f for f in traceback.extract_tb(exc.__traceback__) if f.filename.startswith(root)
            ]
            if frames:
                relative = Path(frames[-1].filename).relative_to(self.template_dir).as_posix()
                where = f"{relative} line {frames[-1].lineno}"
        if isinstance(exc, TemplateError):
            # Jinja's messages name template things, but a lookup keyed by a label value
            # ("has no attribute '<value>'") would quote it: redact whatever the event carries.
            reason = f"{type(exc).__name__}: {exc.message or ''}"
            for value in redact:  # as is, and as repr() shows it (escaped newlines, quotes)
                reason = reason.replace(value, "<data>").replace(repr(value)[1:-1], "<data>")
        else:
            # Python's own messages (int('...'), KeyError(...)) may quote label values.
            reason = f"{type(exc).__name__} raised while rendering"
        return PermanentError("template", f"{where}: {clip(reason, 200)}")


def _capture(
    name: str,
    block: Callable[..., Iterator[str]],
    hook: BlockHook,
    out: dict[str, str],
    depth: list[int],
) -> Callable[..., Iterator[str]]:
    """Wrap a compiled block function (compiled templates call `context.blocks[name][0]`)."""

    def run(context: Context, *args: Any, **kwargs: Any) -> Iterator[str]:
        depth[0] += 1
        try:
            output = "".join(block(context, *args, **kwargs))
        finally:
            depth[0] -= 1
        if depth[0]:  # nested: part of the enclosing block's value
            yield output
            return
        out[name] = output
        yield hook(name, output)

    return run


__all__ = ["Renderer", "TemplateContext", "clip", "sms_value", "template_vars", "text_units"]
