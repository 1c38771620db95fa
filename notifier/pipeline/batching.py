"""Which deliveries share one provider request: recipients getting exactly the same message
through a provider that takes several numbers at once (`ChannelLimits.max_batch`: SendSms takes
up to 1,000), then those left alone with others of the same provider that takes a text per
recipient (`max_mixed_batch`: SendBatchSms takes 100), such as events paging different people.

Two steps, because what a message says is known only once it is rendered: dispatch groups an
event's deliveries by channel and provider (one task for a team's pages instead of one each);
the deliver step then groups the rendered messages into requests (`by_request`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from notifier.channels.base import Channel
from notifier.ledger import DeliveryRecord
from notifier.models import Outgoing
from notifier.pipeline.deps import PipelineDeps

T = TypeVar("T")
# Data a channel copies into every message for its own bookkeeping, not the recipient's text.
_PER_DELIVERY_DATA = ("delivery_id",)


@dataclass(frozen=True)
class Request(Generic[T]):
    """Items that go out in one provider request."""
    members: list[T]
    one_text: bool  # all get the same message (one `send`), or each its own (`send_each`)


def provider_for(deps: PipelineDeps, record: DeliveryRecord) -> Channel | None:
    """The provider a delivery is on, if its channel still has that many."""
    providers = deps.providers.get(record.channel, ())
    return providers[record.provider_index] if record.provider_index < len(providers) else None


def by_provider(deps: PipelineDeps, records: Sequence[DeliveryRecord]) -> list[list[DeliveryRecord]]:
    """The records as deliver tasks: those on the same channel and provider together, up to the
    provider's batch size; records of a provider that takes one recipient per request alone."""
    def key(record: DeliveryRecord) -> Hashable:
        return record.channel, record.provider_index

    def size(record: DeliveryRecord) -> int:
        provider = provider_for(deps, record)
        return provider.limits.max_batch if provider is not None else 1

    return _chunked(records, key, size)


def by_request(items: Sequence[T], provider_of: Callable[[T], Channel],
               message_of: Callable[[T], Outgoing]) -> list[Request[T]]:
    """Items as provider requests: the same message together (`by_message`); each item then
    still alone joins the others of its provider that can go in one `send_each` request (the
    same `mixed_key`, up to `max_mixed_batch`, no address twice)."""
    requests: list[Request[T]] = []
    alone: list[tuple[Hashable, T]] = []
    for group in by_message(items, provider_of, message_of):
        provider = provider_of(group[0])
        mixed = provider.mixed_key(message_of(group[0])) \
            if len(group) == 1 and provider.limits.max_mixed_batch > 1 else None
        if mixed is None:
            requests.append(Request(group, one_text=True))
        else:
            alone.append(((id(provider), mixed), group[0]))
    for chunk in _chunked(alone, lambda pair: pair[0],
                          lambda pair: provider_of(pair[1]).limits.max_mixed_batch,
                          lambda pair: message_of(pair[1]).address):
        requests.append(Request([item for _key, item in chunk], one_text=len(chunk) == 1))
    return requests


def by_message(items: Sequence[T], provider_of: Callable[[T], Channel],
               message_of: Callable[[T], Outgoing]) -> list[list[T]]:
    """Items whose messages are the same, through the same provider, together (up to its batch
    size). Recipients of one event can still get different messages (locale, their name). An
    address appears once per request: two people sharing a phone get a request each, or
    their receipts (keyed by BizId and number) could not be told apart."""
    return _chunked(items, lambda item: _message_key(provider_of(item), message_of(item)),
                    lambda item: provider_of(item).limits.max_batch,
                    lambda item: message_of(item).address)


def _message_key(provider: Channel, message: Outgoing) -> Hashable:
    rendered = message.rendered
    data = {k: v for k, v in message.data.items() if k not in _PER_DELIVERY_DATA}
    return (id(provider), message.kind, rendered.subject, rendered.text, rendered.html,
            json.dumps(dict(rendered.params), sort_keys=True), json.dumps(data, sort_keys=True))


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
