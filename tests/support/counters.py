"""Reading the fleet counters straight from their Redis hashes (what /metrics exports)."""

from __future__ import annotations

import json

import redis

from notifier.metrics import KEY


def counts(client: redis.Redis, metric: str, *labels: int) -> dict[str, float]:
    """A counter's values summed by the labels at these positions (default: the last), joined
    by spaces."""
    out: dict[str, float] = {}
    for field, value in client.hgetall(KEY + metric).items():
        values = json.loads(field)
        name = " ".join(values[i] for i in labels or (-1,))
        out[name] = out.get(name, 0.0) + float(value)
    return out
