"""A Redis password given as redis-py's `?password=` query parameter (its documented form for
unix sockets) is hidden wherever a URL is printed, as one in the userinfo is."""

from __future__ import annotations

import pytest
import redis

from notifier.config import check_redis_url
from notifier.redis_conn import redacted

SECRET = "s3cret-pw"


@pytest.mark.parametrize(("url", "shown"), [
    (f"unix:///run/redis/redis.sock?db=0&password={SECRET}",
     "unix:///run/redis/redis.sock?db=0&password=***"),
    (f"redis://127.0.0.1:6379/0?password={SECRET}", "redis://127.0.0.1:6379/0?password=***"),
    (f"rediss://db:6380/1?username=alerts&password={SECRET}&ssl_cert_reqs=required",
     "rediss://db:6380/1?username=alerts&password=***&ssl_cert_reqs=required"),
    (f"redis://:{SECRET}@db:6379/0?password={SECRET}", "redis://:***@db:6379/0?password=***"),
])
def test_a_password_in_the_query_is_not_printed(url: str, shown: str) -> None:
    check_redis_url(url)  # accepted: notifier up prints it as redacted() shows it
    assert redis.connection.parse_url(url)["password"] == SECRET  # what redis-py sends
    assert redacted(url) == shown
    assert SECRET not in redacted(url)


def test_urls_without_a_password_are_shown_as_written() -> None:
    for url in ("unix:///run/redis/redis.sock?db=0", "redis://db:6379/0?health_check_interval=2",
                "redis://db:6379/0"):
        assert redacted(url) == url
