"""Tasks of subsystems beyond dispatch/deliver (receipts, drills); registered by the worker app."""

from __future__ import annotations

from celery import Celery

from notifier.worker.runtime import Runtime


def register(app: Celery, runtime: Runtime) -> None:
    del app, runtime
