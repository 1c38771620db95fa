"""Fleet-wide metrics kept in Redis and exposed by `GET /metrics`.

Prefork workers on several hosts all add to the same Redis hashes, so one scrape of any API
instance sees the whole fleet (no multiprocess directory, no per-host exporter). Every API
instance exports the same fleet totals: scrape one, or aggregate with max(), not sum().
"""

from __future__ import annotations

import functools
import json
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

import redis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from redis.client import Pipeline

KEY = "ntf:m:"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   300.0)


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: Literal["counter", "histogram"]
    help: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] = ()


SPECS: dict[str, MetricSpec] = {
    spec.name: spec
    for spec in (
        MetricSpec("notifier_events_received", "counter",
                   "Events handed to notifier, by source and outcome (new, duplicate, replay).",
                   ("source", "outcome")),
        MetricSpec("notifier_transactions_finished", "counter",
                   "Transactions that reached a verdict (delivered, partial, failed), counted "
                   "again under the new one when it changes (a failed SMS receipt).", ("status",)),
        MetricSpec("notifier_transactions_revised", "counter",
                   "Transactions whose verdict changed after it was counted finished, by the "
                   "verdict they left: finished minus revised is what ended each way.",
                   ("status",)),
        MetricSpec("notifier_deliveries", "counter",
                   "Deliveries that reached an outcome (sent, delivered, failed, fallen_back, "
                   "suppressed), counted again under the new one when a receipt changes it.",
                   ("channel", "provider", "outcome")),
        MetricSpec("notifier_deliveries_revised", "counter",
                   "Deliveries whose counted outcome changed (sent, then a receipt), by the "
                   "outcome they left: deliveries minus revised is what ended each way.",
                   ("channel", "provider", "outcome")),
        MetricSpec("notifier_send_attempts", "counter",
                   "Provider calls, by result (sent or the error class).",
                   ("channel", "provider", "result")),
        MetricSpec("notifier_retries", "counter", "Sends scheduled for another try.",
                   ("channel", "provider", "error_class")),
        MetricSpec("notifier_deferrals", "counter",
                   "Deliveries deferred by a fleet-wide rate limit.", ("channel", "scope")),
        MetricSpec("notifier_fallbacks", "counter",
                   "Deliveries handed to the next channel or provider.",
                   ("from_channel", "to_channel", "reason")),
        MetricSpec("notifier_digests", "counter",
                   "Digest messages that merged deliveries held back by a recipient limit.",
                   ("channel",)),
        MetricSpec("notifier_receipts", "counter",
                   "Provider delivery receipts, by result: delivered, failed, duplicate, stale, "
                   "mismatch, expired, query_*, or invalid (a pushed record that could not be "
                   "read, dropped).", ("channel", "result")),
        MetricSpec("notifier_replies", "counter",
                   "SMS replies (Aliyun SmsUp), by result: confirmed, already_confirmed, or the "
                   "reason a reply was rejected (bad_number, no_code, unknown_code, "
                   "expired_code, ...), or invalid (a pushed record that could not be read, "
                   "dropped).", ("result",)),
        MetricSpec("notifier_provider_latency_seconds", "histogram",
                   "Time of one provider call.", ("channel", "provider"), LATENCY_BUCKETS),
        MetricSpec("notifier_end_to_end_latency_seconds", "histogram",
                   "From accepting an event to the provider accepting a delivery of it.",
                   ("channel",), LATENCY_BUCKETS),
    )
}


def _labels_field(values: Mapping[str, str], spec: MetricSpec) -> str:
    return _field(tuple(str(values.get(name, "")) for name in spec.labels))


@functools.lru_cache(maxsize=4096)
def _field(values: tuple[str, ...]) -> str:
    """A series' hash field. Label sets are few and repeat on every delivery, so each is
    encoded once rather than on every increment of the hot path."""
    return json.dumps(list(values), ensure_ascii=False)


def metric_key(name: str) -> str:
    return KEY + name


def metric_field(name: str, **labels: str) -> str:
    """The hash field of one series, for writers that update a counter inside a script."""
    return _labels_field(labels, SPECS[name])


class Metrics:
    """Writers used by the pipeline and the API: one round trip each, or queued on `into`."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def inc(self, name: str, amount: float = 1.0, *, into: Pipeline | None = None,
            **labels: str) -> None:
        spec = SPECS[name]
        (into if into is not None else self.redis).hincrbyfloat(
            KEY + name, _labels_field(labels, spec), amount)

    def observe(self, name: str, value: float, *, into: Pipeline | None = None,
                **labels: str) -> None:
        spec = SPECS[name]
        base = _labels_field(labels, spec)
        index = bisect_left(spec.buckets, value)
        pipe = into if into is not None else self.redis.pipeline(transaction=False)
        if index < len(spec.buckets):
            pipe.hincrby(KEY + name, f"{base}|{spec.buckets[index]}", 1)
        pipe.hincrbyfloat(KEY + name, f"{base}|sum", value)
        pipe.hincrby(KEY + name, f"{base}|count", 1)
        if into is None:
            pipe.execute()


Gauges = Callable[[redis.Redis], list[tuple[str, str, Mapping[str, str], float]]]


class FleetCollector(Collector):
    """Reads the fleet's metrics from Redis at scrape time, plus computed gauges."""

    def __init__(self, client: redis.Redis, gauges: list[Gauges] | None = None) -> None:
        self.redis = client
        self.gauges = gauges or []

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily]:
        up = GaugeMetricFamily("notifier_redis_up", "1 when the API could read Redis.")
        started = time.monotonic()
        try:
            families = list(self._stored()) + list(self._computed())
        except redis.RedisError:
            up.add_metric([], 0.0)
            yield up
            return
        up.add_metric([], 1.0)
        yield up
        yield from families
        scrape = GaugeMetricFamily("notifier_scrape_duration_seconds", "Time to read Redis.")
        scrape.add_metric([], time.monotonic() - started)
        yield scrape

    def _stored(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        pipe = self.redis.pipeline(transaction=False)
        for name in SPECS:
            pipe.hgetall(KEY + name)
        for (name, spec), raw in zip(SPECS.items(), pipe.execute(), strict=True):
            data = {k.decode(): float(v) for k, v in raw.items()}
            if spec.kind == "counter":
                family = CounterMetricFamily(name, spec.help, labels=list(spec.labels))
                for field, value in sorted(data.items()):
                    family.add_metric(json.loads(field), value)
                yield family
            else:
                yield self._histogram(spec, data)

    @staticmethod
    def _histogram(spec: MetricSpec, data: dict[str, float]) -> HistogramMetricFamily:
        family = HistogramMetricFamily(spec.name, spec.help, labels=list(spec.labels))
        series = {field.rsplit("|", 1)[0] for field in data}
        for base in sorted(series):
            cumulative, buckets = 0.0, []
            for bound in spec.buckets:
                cumulative += data.get(f"{base}|{bound}", 0.0)
                buckets.append((str(bound), cumulative))
            count = data.get(f"{base}|count", 0.0)
            buckets.append(("+Inf", count))
            family.add_metric(json.loads(base), buckets, data.get(f"{base}|sum", 0.0))
        return family

    def _computed(self) -> Iterator[GaugeMetricFamily]:
        groups: dict[str, GaugeMetricFamily] = {}
        for gauge in self.gauges:
            for name, help_text, labels, value in gauge(self.redis):
                family = groups.get(name)
                if family is None:
                    family = groups[name] = GaugeMetricFamily(name, help_text, labels=list(labels))
                family.add_metric(list(labels.values()), value)
        yield from groups.values()
