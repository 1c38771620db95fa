"""Where the ledger lives in Redis: the key names the ledger, the accept script call and the
API's gauges share."""

from __future__ import annotations

PREFIX = "ntf:"
OUTBOX = f"{PREFIX}outbox"  # accepted transactions not yet fanned out (txid -> sweep after)
DEADLETTERS = f"{PREFIX}deadletters"  # failed transactions (txid -> failed at)
OPEN = f"{PREFIX}open"  # deliveries not yet final (delivery id -> created at), for the reaper


def tx_key(txid: str) -> str:
    return f"{PREFIX}tx:{txid}"


def delivery_key(did: str) -> str:
    return f"{PREFIX}dl:{did}"
