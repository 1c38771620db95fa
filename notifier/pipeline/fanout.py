"""Expand a routed event into deliveries: one per (channel, recipient address)."""

from __future__ import annotations

from notifier.config import Recipient, Settings
from notifier.ids import delivery_id
from notifier.ledger import DeliveryRecord
from notifier.pipeline.routing import RoutePlan


def addresses(recipient: Recipient, channel: str) -> list[str]:
    """A recipient's addresses on a channel; empty when they cannot be reached there."""
    if channel == "sms":
        return [recipient.phone] if recipient.phone else []
    if channel == "email":
        return [recipient.email] if recipient.email else []
    if channel == "push":
        return list(recipient.push_tokens)
    return []


def plan_deliveries(settings: Settings, txid: str, kind: str, plan: RoutePlan) -> list[DeliveryRecord]:
    records: list[DeliveryRecord] = []

    def add(channel: str, name: str, address: str, chain: list[str], reason: str = "") -> None:
        records.append(
            DeliveryRecord(
                id=delivery_id(txid, len(records)),
                transaction_id=txid,
                channel=channel,
                recipient=name,
                address=address,
                kind=kind,
                fallback_chain=chain,
                reason=reason,
            )
        )

    for name in plan.recipients:
        recipient = settings.recipients.get(name)
        if recipient is None:
            # Named by an event accepted under an earlier config (renamed or removed since, or
            # a group that was): a delivery without an address fails on its own, and the rest
            # of the dispatch message goes out (a KeyError here failed all of it, every time
            # the outbox sweep sent it again, and its transactions stayed open for ever).
            add(plan.channels[0], name, "", [], reason="not a recipient in the current config")
            continue
        reachable = [(c, a) for c in plan.channels for a in addresses(recipient, c)]
        if reachable:
            for channel, address in reachable:
                add(channel, name, address, list(plan.fallback))
            continue
        # Not reachable on any fan-out channel: start from the first fallback that reaches them.
        for i, channel in enumerate(plan.fallback):
            found = addresses(recipient, channel)
            if found:
                for address in found:
                    add(channel, name, address, list(plan.fallback[i + 1 :]),
                        reason=f"no address on {', '.join(plan.channels)}")
                break
        else:
            wanted = ", ".join(plan.channels + plan.fallback)
            add(plan.channels[0], name, "", [], reason=f"no address on {wanted}")
    return records
