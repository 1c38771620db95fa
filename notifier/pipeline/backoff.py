"""Exponential backoff with jitter; a provider's own Retry-After wins when it asks for longer."""

from __future__ import annotations

import math
import random

from notifier.config import RetryPolicy

# The longest a provider's Retry-After holds an alert. Longer (or "inf", "1e12" from a proxy
# in the way) is not a window a provider means: the delivery would never be tried again.
RETRY_AFTER_MAX = 3600.0


def retry_delay(policy: RetryPolicy, attempt: int, retry_after: float | None = None,
                rng: random.Random | None = None) -> float:
    """Delay before attempt `attempt + 1` (attempt counts from 1)."""
    draw: float = (rng or random.Random()).uniform(-policy.jitter, policy.jitter)
    delay = min(policy.max_delay, policy.base_delay * (2.0 ** max(attempt - 1, 0)))
    delay *= 1 + draw
    if retry_after is not None and not math.isnan(retry_after):
        # The provider knows its window; jitter only upward so the fleet does not stampede back.
        delay = max(delay, min(retry_after, RETRY_AFTER_MAX) * (1 + abs(draw) * 0.2))
    return max(delay, 0.0)
