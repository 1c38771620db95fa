"""One way to reach Redis from a URL: plain `redis://` / `rediss://`, or Sentinel.

A Sentinel URL uses kombu's form, so the same string serves the Celery broker:
``sentinel://[:password@]host1:26379[/db];sentinel://host2:26379`` plus `redis_sentinel_master`
(the monitored master's name). Clients then follow failovers: they ask the sentinels for the
current master on (re)connect.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.client import Pipeline
from redis.sentinel import Sentinel

from notifier.errors import ConfigError


def is_sentinel(url: str) -> bool:
    return url.startswith("sentinel://")


def parse_sentinel_url(url: str) -> tuple[list[tuple[str, int]], str | None, int]:
    """-> (sentinel addresses, master password, db)."""
    nodes: list[tuple[str, int]] = []
    password: str | None = None
    db = 0
    for part in url.split(";"):
        parsed = urlsplit(part.strip())
        if parsed.scheme != "sentinel" or not parsed.hostname:
            raise ConfigError(f"redis_url: {part.split('@')[-1]!r} is not sentinel://host:port")
        nodes.append((parsed.hostname, parsed.port or 26379))
        password = parsed.password or password
        if parsed.path.strip("/"):
            db = int(parsed.path.strip("/"))
    return nodes, password, db


def redacted(url: str) -> str:
    """`url` (a sentinel list too) with any password shown as ***, for printing."""
    return ";".join(_redacted_one(part) for part in url.split(";"))


# redis-py also takes the password as a query parameter (its documented form for unix sockets,
# unix:///path.sock?password=...).
_QUERY_PASSWORD = re.compile(r"(?<![^&])(password=)[^&]*")


def _redacted_one(url: str) -> str:
    base, mark, query = url.partition("?")
    url = base + mark + _QUERY_PASSWORD.sub(r"\1***", query)
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def connect(url: str, master: str | None = None, **options: Any) -> redis.Redis:
    """A client for `url`; with Sentinel, one that always talks to the current master."""
    if not is_sentinel(url):
        return redis.Redis.from_url(url, **options)
    if not master:
        raise ConfigError("redis_sentinel_master: required with a sentinel:// redis_url")
    nodes, password, db = parse_sentinel_url(url)
    timeouts = {k: v for k, v in options.items() if k.startswith("socket_")}
    sentinel = Sentinel(nodes, sentinel_kwargs=timeouts, **timeouts)  # type: ignore[no-untyped-call]
    client: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
        master, db=db, password=password, **options)
    return client


def queue_script(pipe: Pipeline, source: str, keys: Sequence[str], args: Sequence[Any]) -> None:
    """Queue a Lua script on a pipeline, as EVAL: an EVALSHA's NOSCRIPT reply (Redis restarted
    or flushed its scripts) could not be retried alone inside the pipeline, and redis-py's
    registered scripts would add a SCRIPT EXISTS round trip to every pipeline."""
    pipe.eval(source, len(keys), *keys, *args)
