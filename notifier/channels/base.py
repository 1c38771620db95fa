"""What every channel provider is: it sends one message and raises a classified error.

A channel knows nothing of retries, rate limits, breakers, fallback or the ledger.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import redis

import celeryconfig
from notifier.models import Outgoing, Receipt

AddressKind = Literal["phone", "email", "push_token"]

# The longest one provider call may take, whatever its configured timeouts: Celery's soft time
# limit (celeryconfig: 50 s at the default 60 s hard limit) less 10 s (a fifth of a short limit)
# for the rest of the step (claim, render, records; SMTP's QUIT and close: email_smtp). A call
# still running at the soft limit is abandoned (notifier.aio) and recorded as maybe sent: a
# timeout of our own is a classified, honest failure instead.
_SOFT_LIMIT = celeryconfig.task_soft_time_limit
MAX_SEND_SECONDS = max(_SOFT_LIMIT - min(10.0, _SOFT_LIMIT / 5), 1.0)


def send_budget(timeout: float, steps: int) -> float:
    """The deadline for a whole provider call of `steps` round trips of `timeout` each."""
    return min(timeout * steps, MAX_SEND_SECONDS)


@dataclass(frozen=True)
class ChannelLimits:
    """Per-channel facts as data (Apprise's body_maxlen / default_batch_size)."""

    address: AddressKind
    body_maxlen: int  # longest text worth sending; the renderer cuts to it
    title_maxlen: int = 0  # 0: the channel has no title
    max_batch: int = 1  # recipients one provider request may carry, all getting the same text
    # Recipients one request may carry when each gets a text of its own (`Channel.send_each`:
    # Aliyun's SendBatchSms takes 100): events paging different people share a request.
    max_mixed_batch: int = 1


@dataclass(frozen=True)
class ChannelContext:
    """What a provider may use besides its own config, handed in so nothing reaches for globals."""

    redis: redis.Redis
    env: Mapping[str, str] = field(default_factory=dict)


class Channel(ABC):
    """One provider of one channel (e.g. sms via aliyun)."""

    channel: ClassVar[str]  # "sms" | "email" | "push"
    limits: ClassVar[ChannelLimits]
    # Does `lookup` ask the provider? If not, a maybe-sent last attempt moves on at once
    # instead of waiting a backoff for a look-up that cannot find anything.
    can_look_up: ClassVar[bool] = False

    def __init__(self, provider_name: str) -> None:
        self.provider_name = provider_name

    @property
    def breaker_name(self) -> str:
        return f"{self.channel}:{self.provider_name}"

    @abstractmethod
    async def send(self, message: Outgoing) -> Receipt:
        """Send one message. Raise a `notifier.errors.DeliveryError` subclass on failure.

        A provider whose `limits.max_batch` is above 1 may get several recipients at once:
        `address` then lists them, comma-separated, all getting the same message."""

    def mixed_key(self, message: Outgoing) -> Hashable | None:
        """What messages must have in common to go out in one `send_each` request (asked only
        when `limits.max_mixed_batch` is above 1); None: this message goes alone."""
        del message
        return None

    async def send_each(self, messages: Sequence[Outgoing], batch_id: str) -> Receipt:
        """Send several messages, each to its own recipient with its own text, in one request
        under `batch_id` (the provider's OutId); all share a `mixed_key` and no address twice.
        One receipt for all; the request succeeds or fails as a whole."""
        del messages, batch_id
        raise NotImplementedError(f"{type(self).__name__} sends one text per request")

    async def lookup(self, message: Outgoing, sent_after: float) -> Receipt | None:
        """After a MaybeSentError: did `message` go out after `sent_after` (epoch seconds)?

        Providers that cannot tell return None, and the pipeline resends.
        """
        del message, sent_after
        return None

    async def aclose(self) -> None:  # noqa: B027 - optional hook, most providers hold nothing
        """Release connections; called when the worker process shuts down."""
