"""A Celery app bound to this config's Redis, and publishing tasks by name.

The API, the client and the scheduler use this without importing the worker's tasks.
"""

from __future__ import annotations

from celery import Celery

import celeryconfig
from notifier.errors import BrokerUnavailable


def make_celery(redis_url: str, sentinel_master: str | None = None) -> Celery:
    app = Celery("notifier", set_as_current=False)
    app.config_from_object(celeryconfig)
    app.conf.broker_url = redis_url
    if sentinel_master:  # kombu's Redis transport follows the master the sentinels name
        app.conf.broker_transport_options = {**celeryconfig.broker_transport_options,
                                             "master_name": sentinel_master}
    return app


class CeleryPublisher:
    def __init__(self, app: Celery) -> None:
        self.app = app

    def publish(self, task: str, args: list[str], queue: str) -> None:
        try:
            self.app.send_task(task, args=args, queue=queue)
        except Exception as exc:  # kombu/redis raise many types for "broker unreachable"
            raise BrokerUnavailable(f"cannot publish {task}: {type(exc).__name__}") from None
