"""The worker's Celery app and its tasks: thin shells over the pipeline."""

from __future__ import annotations

from celery import Celery, Task

from notifier.celery_app import make_celery
from notifier.config import Settings
from notifier.pipeline.deliver import deliver_batch
from notifier.pipeline.digest import flush
from notifier.pipeline.dispatch import dispatch_all, inline_token
from notifier.tasks_spec import DELIVER, DIGEST, DISPATCH, TIMER
from notifier.worker import extra_tasks
from notifier.worker.runtime import Runtime
from notifier.worker.timers import fire_timer


def create_worker_app(settings: Settings) -> Celery:
    app = make_celery(settings.redis_url, settings.redis_sentinel_master)
    runtime = Runtime(settings, app)

    @app.task(name=DISPATCH, bind=True)  # type: ignore[untyped-decorator]
    def dispatch_task(self: Task, *txids: str) -> str:
        # One delivery per transaction goes out in this task; its claim token comes from this
        # task's id, so a redelivery of this message may take over the send (see pipeline.dispatch).
        done = dispatch_all(runtime.deps(), txids, inline_token(str(self.request.id)), runtime.consumes)
        return ",".join(done)

    @app.task(name=DELIVER, bind=True)  # type: ignore[untyped-decorator]
    def deliver_task(self: Task, *delivery_ids: str) -> str:
        # The task id is the claim token: a redelivery of this very message may take over.
        # Several ids: one event's recipients that one provider request may carry together.
        return ",".join(deliver_batch(runtime.deps(), delivery_ids, str(self.request.id)))

    @app.task(name=DIGEST, bind=True)  # type: ignore[untyped-decorator]
    def digest_task(self: Task, target: str) -> str:
        return flush(runtime.deps(), target)

    @app.task(name=TIMER, bind=True)  # type: ignore[untyped-decorator]
    def timer_task(self: Task, timer: str) -> str:
        return fire_timer(runtime.deps(), timer)

    extra_tasks.register(app, runtime)
    app.conf.notifier_runtime = runtime
    return app
