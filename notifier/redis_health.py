"""What Redis itself says about its fitness for notifier: does it take writes, and does it keep
every key (maxmemory-policy noeviction)?

At `maxmemory` with `noeviction` Redis answers reads and refuses writes (OOM): the API answers
every webhook 503 while PING and every read-only check still succeed. Under any other policy it
silently evicts keys instead (ledger entries, dedup and idempotency keys, queued tasks, rate-limit
buckets). Managed Redis often disables CONFIG, so the policy is read from INFO first.
"""

from __future__ import annotations

import logging

import redis

PROBE_KEY = "ntf:probe:writable"
# A command refused (renamed, disabled), or an answer redis-py cannot read as one (a proxy, or
# something that is not Redis, answering in its own way): the policy is not known.
_NOT_TOLD = (redis.ResponseError, AttributeError, TypeError, ValueError)
WANTED_POLICY = "noeviction"
log = logging.getLogger(__name__)


def maxmemory_policy(client: redis.Redis) -> str | None:
    """The server's maxmemory-policy, from INFO memory or else CONFIG GET; None when both are
    refused (renamed or disabled commands). Connection errors propagate."""
    try:
        info = client.info("memory")
        if info.get("maxmemory_policy"):
            return str(info["maxmemory_policy"])
    except _NOT_TOLD:
        pass
    try:
        value = client.config_get("maxmemory-policy").get("maxmemory-policy")
    except _NOT_TOLD:
        return None
    return str(value) if value else None


def writable(client: redis.Redis) -> bool:
    """Whether Redis takes a write now: False when it refuses (OOM at maxmemory, MISCONF after a
    failed save, READONLY on a replica). Connection errors propagate."""
    try:
        client.set(PROBE_KEY, "1", px=60_000)
    except redis.ResponseError:
        return False
    return True


def check_eviction_policy(client: redis.Redis) -> str | None:
    """Log a warning unless Redis is known to run with `noeviction`; the policy read, if any.
    Meant for process start: an unreachable Redis is left to the paths that handle outages."""
    try:
        policy = maxmemory_policy(client)
    except redis.RedisError as exc:
        log.info("could not check Redis' maxmemory-policy (%s)", type(exc).__name__)
        return None
    if policy is None:
        log.warning("could not read Redis' maxmemory-policy (INFO and CONFIG refused): make sure "
                    "it is %s, or Redis may evict ledger entries, dedup keys and queued tasks",
                    WANTED_POLICY)
    elif policy != WANTED_POLICY:
        log.warning("Redis runs with maxmemory-policy %s: set it to %s (at maxmemory, Redis "
                    "silently evicts ledger entries, dedup keys, rate-limit buckets and queued "
                    "tasks under any other policy)", policy, WANTED_POLICY)
    return policy
