"""Tasks of subsystems beyond dispatch/deliver (receipts, replies, reconciler): thin shells."""

from __future__ import annotations

import json

from celery import Celery, Task

from notifier import receipts, reconciler
from notifier.drills import replies
from notifier.drills.service import DrillService
from notifier.periodic import clear_kick
from notifier.tasks_spec import APPLY_RECEIPTS, APPLY_REPLIES, RECONCILE
from notifier.worker.runtime import Runtime


def register(app: Celery, runtime: Runtime) -> None:
    @app.task(name=APPLY_RECEIPTS, bind=True)  # type: ignore[untyped-decorator]
    def apply_receipts_task(self: Task) -> str:
        deps = runtime.deps()
        clear_kick(deps.ledger.redis, APPLY_RECEIPTS)
        return json.dumps(receipts.apply_due(deps))

    @app.task(name=APPLY_REPLIES, bind=True)  # type: ignore[untyped-decorator]
    def apply_replies_task(self: Task) -> str:
        deps = runtime.deps()
        clear_kick(deps.ledger.redis, APPLY_REPLIES)
        return json.dumps(replies.apply_due(DrillService.from_deps(deps)))

    @app.task(name=RECONCILE, bind=True)  # type: ignore[untyped-decorator]
    def reconcile_task(self: Task) -> str:
        deps = runtime.deps()
        clear_kick(deps.ledger.redis, RECONCILE)
        return json.dumps(reconciler.reconcile(deps))
