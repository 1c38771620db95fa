"""Exponential backoff with jitter; a provider's own Retry-After wins when it asks for longer."""

from __future__ import annotations

import random

from notifier.config import RetryPolicy


def retry_delay(policy: RetryPolicy, attempt: int, retry_after: float | None = None,
                rng: random.Random | None = None) -> float:
    """Delay before attempt `attempt + 1` (attempt counts from 1)."""
    draw: float = (rng or random.Random()).uniform(-policy.jitter, policy.jitter)
    delay = min(policy.max_delay, policy.base_delay * (2.0 ** max(attempt - 1, 0)))
    delay *= 1 + draw
    if retry_after is not None:
        # The provider knows its window; jitter only upward so the fleet does not stampede back.
        delay = max(delay, retry_after * (1 + abs(draw) * 0.2))
    return max(delay, 0.0)
