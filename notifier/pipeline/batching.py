"""Which deliveries share one provider request: recipients of the same event on a provider that
takes several at once (`ChannelLimits.max_batch`: SendSms takes up to 1,000 numbers), getting
exactly the same message.

Two steps, because what a message says is known only once it is rendered: dispatch groups an
event's deliveries by channel and provider (one task for a team's pages instead of one each);
the deliver step then sends each set of identical messages in one request.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

from notifier.channels.base import Channel
from notifier.ledger import DeliveryRecord
from notifier.models import Outgoing
from notifier.pipeline.deps import PipelineDeps

T = TypeVar("T")
# Data a channel copies into every message for its own bookkeeping, not the recipient's text.
_PER_DELIVERY_DATA = ("delivery_id",)


def by_provider(deps: PipelineDeps, records: Sequence[DeliveryRecord]) -> list[list[DeliveryRecord]]:
    """The records as deliver tasks: those on the same channel and provider together, up to the
    provider's batch size; records of a provider that takes one recipient per request alone."""
    def key(record: DeliveryRecord) -> Hashable:
        return record.channel, record.provider_index

    def size(record: DeliveryRecord) -> int:
        providers = deps.providers.get(record.channel, ())
        return providers[record.provider_index].limits.max_batch \
            if record.provider_index < len(providers) else 1

    return _chunked(records, key, size)


def by_message(items: Sequence[T], provider_of: Callable[[T], Channel],
               message_of: Callable[[T], Outgoing]) -> list[list[T]]:
    """Items whose messages are the same, through the same provider, together (up to its batch
    size). Recipients of one event can still get different messages (locale, their name). An
    address appears once per request: two people sharing a phone get a request each, or
    their receipts (keyed by BizId and number) could not be told apart."""
    def key(item: T) -> Hashable:
        message = message_of(item)
        rendered = message.rendered
        data = {k: v for k, v in message.data.items() if k not in _PER_DELIVERY_DATA}
        return (id(provider_of(item)), message.kind, rendered.subject, rendered.text, rendered.html,
                json.dumps(dict(rendered.params), sort_keys=True), json.dumps(data, sort_keys=True))

    return _chunked(items, key, lambda item: provider_of(item).limits.max_batch,
                    lambda item: message_of(item).address)


def _chunked(items: Sequence[T], key: Callable[[T], Hashable], size: Callable[[T], int],
             address: Callable[[T], str] | None = None) -> list[list[T]]:
    """Group by key, in first-seen order, each group cut to its size; an item whose address its
    key's open chunk already has starts a chunk of its own."""
    groups: dict[Hashable, list[tuple[list[T], set[str]]]] = {}
    order: list[list[T]] = []
    for item in items:
        chunks = groups.setdefault(key(item), [])
        where = address(item) if address is not None else ""
        fits = next((c for c in chunks if len(c[0]) < max(1, size(item)) and where not in c[1]), None)
        if fits is None:
            fits = ([], set())
            chunks.append(fits)
            order.append(fits[0])
        fits[0].append(item)
        if where:
            fits[1].add(where)
    return order
