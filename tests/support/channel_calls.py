"""Driving one channel's `send` from a synchronous test, as the worker's ProcessLoop does."""

from __future__ import annotations

import asyncio

import pytest

from notifier.channels.base import Channel
from notifier.errors import DeliveryError
from notifier.models import Outgoing, Receipt


def send_now(channel: Channel, message: Outgoing) -> Receipt:
    return asyncio.run(channel.send(message))


def send_error(channel: Channel, message: Outgoing) -> DeliveryError:
    """The classified error the send raised (the test fails if it raised none)."""
    with pytest.raises(DeliveryError) as info:
        send_now(channel, message)
    return info.value
