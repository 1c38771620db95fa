"""Provider config -> Channel instance: an explicit table, no directory scanning."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from notifier.channels.base import Channel, ChannelContext
from notifier.channels.email_smtp import SmtpEmail
from notifier.channels.push_fcm import FcmPush
from notifier.channels.sandbox import SandboxEmail, SandboxPush, SandboxSms
from notifier.channels.sms_aliyun import AliyunSms
from notifier.config import Settings

# (channel, provider) -> constructor taking (provider config, context).
PROVIDERS: dict[tuple[str, str], Callable[[Any, ChannelContext], Channel]] = {
    ("sms", "aliyun"): AliyunSms,
    ("sms", "sandbox"): SandboxSms,
    ("email", "smtp"): SmtpEmail,
    ("email", "sandbox"): SandboxEmail,
    ("push", "fcm"): FcmPush,
    ("push", "sandbox"): SandboxPush,
}


def build_providers(settings: Settings, context: ChannelContext) -> dict[str, list[Channel]]:
    """Every configured channel's providers, in the order they are tried."""
    return {
        name: [PROVIDERS[(name, p.provider)](p, context) for p in channel.providers]
        for name, channel in settings.channels.items()
    }
