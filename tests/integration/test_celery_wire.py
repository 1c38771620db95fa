"""The dispatch message the accept script queues is what Celery itself would have queued."""

from __future__ import annotations

import base64
import json

import pytest
import redis

from notifier.celery_app import make_celery
from notifier.celery_wire import TaskMessages
from notifier.tasks_spec import DISPATCH, DISPATCH_QUEUE

PER_MESSAGE = {("headers", "id"), ("headers", "root_id"), ("headers", "origin"),
               ("properties", "correlation_id"), ("properties", "delivery_tag"),
               ("properties", "reply_to")}


@pytest.mark.parametrize("args", [["tx-1"], ["tx-1", "tx-2", "tx-3"]], ids=["one", "batch"])
def test_message_matches_what_send_task_lpushes(redis_url: str, redis_client: redis.Redis,
                                                args: list[str]) -> None:
    make_celery(redis_url).send_task(DISPATCH, args=args, queue=DISPATCH_QUEUE)
    (by_celery,) = [json.loads(m) for m in redis_client.lrange(DISPATCH_QUEUE, 0, -1)]
    task_id, text = TaskMessages(DISPATCH, DISPATCH_QUEUE).message(args)
    ours = json.loads(text)

    assert base64.b64decode(ours["body"]) == base64.b64decode(by_celery["body"])
    assert ours["headers"]["id"] == ours["headers"]["root_id"] == task_id
    assert ours["properties"]["correlation_id"] == task_id
    for section in ("headers", "properties"):
        expected = {k: v for k, v in by_celery[section].items() if (section, k) not in PER_MESSAGE}
        got = {k: v for k, v in ours[section].items() if (section, k) not in PER_MESSAGE}
        assert got == expected, section
    top = {k: v for k, v in by_celery.items() if k not in ("headers", "properties", "body")}
    assert {k: v for k, v in ours.items() if k not in ("headers", "properties", "body")} == top


def test_ids_are_fresh_per_message() -> None:
    messages = TaskMessages(DISPATCH, DISPATCH_QUEUE)
    ids = {messages.message(["tx-1"])[0] for _ in range(1000)}
    assert len(ids) == 1000
