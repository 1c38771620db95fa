"""What the API's request handlers share: Redis, the ledger, the intake, the metrics registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from notifier.api.gauges import fleet_gauges
from notifier.api.script_batch import ScriptBatcher
from notifier.celery_app import CeleryPublisher, make_celery
from notifier.config import Settings
from notifier.intake import Intake
from notifier.ledger import Ledger
from notifier.ledger_accept import MAX_EVENTS, AcceptCall
from notifier.ledger_scripts import ACCEPT
from notifier.metrics import FleetCollector, Metrics
from notifier.records import AcceptResult
from notifier.redis_conn import connect


class ApiState:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.redis = connect(settings.redis_url, settings.redis_sentinel_master, socket_connect_timeout=1,
                                          socket_timeout=3, max_connections=64)
        self.ledger = Ledger(self.redis, settings.retention)
        self.metrics = Metrics(self.redis)
        self.celery = make_celery(settings.redis_url, settings.redis_sentinel_master)
        self.publisher = CeleryPublisher(self.celery)  # the callbacks' kicks to the worker
        self.intake = Intake(settings, self.ledger)
        self.accept_batcher: ScriptBatcher[AcceptCall, AcceptResult] = ScriptBatcher(
            self.redis, ACCEPT, combine=self.intake.script_call, split=self.intake.results,
            max_items=MAX_EVENTS)
        self.registry = CollectorRegistry()
        self.registry.register(FleetCollector(self.redis, fleet_gauges(settings)))
