"""notifier's load bench: `python -m bench.run [--quick] [--profile]` (see bench/README.md).

Starts the real stack on loopback — a private redis-server, `notifier api`, `notifier worker
--concurrency N`, `notifier scheduler`, the Dysmsapi fake (or the sandbox SMS provider) — and,
in the same run, the two baselines: a bare uvicorn endpoint and a bare Celery no-op task on the
same Redis with the same concurrency. Prints a table (figure, value, baseline, ratio, target)
and writes bench/results/latest.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import redis
import yaml

from bench import loadgen
from bench.baselines import NOOP_QUEUE, NOOP_TASK, noop_app
from bench.loadgen import LoadResult, percentile
from bench.procs import Procs, cpu_seconds, port_open, wait_for
from bench.sinks import FakeSink, SandboxSink, Sink
from notifier.tasks_spec import ALL_QUEUES
from tests.support.servers import free_port

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TOKEN = "bench-token"
ALERT_NAMES = 50  # webhook i fires BenchAlert{i % 50}
KEY_ID, KEY_SECRET = "LTAIbenchbenchbench", "bench-secret-not-real"


@dataclass(frozen=True)
class Plan:
    steady_rate: float = 200.0  # webhooks/s offered for the latency target
    steady_seconds: float = 15.0
    # Enough requests in flight that neither server idles: notifier's wait on the accept
    # script's round trip, so 32 left its two API processes at 87-89 % of one core between them
    # (and batches small); the bare endpoint is the load generator's limit either way.
    sat_connections: int = 128
    sat_seconds: float = 10.0
    sat_max: int = 12000  # the bare endpoint needs about a second of it: a short burst was noisy
    # Saturation runs in rounds, a burst at the bare endpoint then one at notifier, and each
    # reports its median round: one burst of either moved by ±10 % from run to run, and the
    # machine's speed drifts over a run's minutes, which a ratio of two phases measured two
    # minutes apart took in full.
    sat_rounds: int = 5
    e2e_rate: float = 50.0  # events/s for the webhook -> provider latency target
    e2e_seconds: float = 30.0
    noop_tasks: int = 10000
    drain_window: float = 40.0  # longest the end-to-end drain is measured
    drain_timeout: float = 180.0


FULL = Plan()
QUICK = Plan(steady_seconds=5.0, sat_seconds=4.0, sat_max=1500, sat_rounds=1, e2e_seconds=6.0,
             noop_tasks=3000, drain_window=12.0, drain_timeout=45.0)


# -- payloads ---------------------------------------------------------------------------------

def webhook(i: int, nonce: str) -> bytes:
    """One Alertmanager v4 webhook; every one is its own group (groupKey + fingerprint), so
    notifier's dedup never short-circuits it."""
    name = f"BenchAlert{i % ALERT_NAMES}"
    labels = {"alertname": name, "severity": "warning", "cluster": "bench",
              "instance": f"host-{nonce}-{i}:9100"}
    body = {
        "version": "4", "receiver": "notifier", "status": "firing", "truncatedAlerts": 0,
        "groupKey": f'{{}}:{{alertname="{name}", instance="host-{nonce}-{i}:9100"}}',
        "groupLabels": {"alertname": name, "instance": labels["instance"]},
        "commonLabels": labels, "commonAnnotations": {"summary": f"bench load {i}"},
        "externalURL": "http://alertmanager.bench:9093",
        "alerts": [{"status": "firing", "labels": labels,
                    "annotations": {"summary": f"bench load {i}"},
                    "startsAt": "2026-01-01T00:00:00Z", "endsAt": "0001-01-01T00:00:00Z",
                    "generatorURL": "http://prometheus.bench:9090/graph",
                    "fingerprint": f"{nonce}{i:010x}"}],
    }
    return json.dumps(body, separators=(",", ":")).encode()


class Payloads:
    def __init__(self, port: int) -> None:
        self.port = port
        self.nonce = f"{os.getpid():x}{int(time.time()) % 100000:x}"
        self.next = 0

    def take(self, n: int) -> list[bytes]:
        out = [loadgen.build_request("127.0.0.1", self.port, "/v1/alertmanager",
                                     webhook(self.next + k, self.nonce),
                                     {"Authorization": f"Bearer {TOKEN}"}) for k in range(n)]
        self.next += n
        return out


# -- figures ----------------------------------------------------------------------------------

def ms(value: float) -> float | None:
    return None if value != value else round(value * 1000, 2)  # NaN (no samples) -> null


LOADGEN = "loadgen (this process)"


class Usage:
    """CPU seconds per process (with its children) and Redis commands, over one phase."""

    def __init__(self, procs: Procs, client: redis.Redis) -> None:
        self.procs, self.redis = procs, client
        self.started = 0.0
        self.cpu: dict[str, float] = {}
        self.loadgen_cpu = 0.0  # the load generator runs in this process
        self.commands: dict[str, int] = {}

    def _commands(self) -> dict[str, int]:
        stats = self.redis.info("commandstats")
        return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}

    def start(self) -> Usage:
        self.started = time.monotonic()
        self.cpu = {name: cpu_seconds(self.procs.pid(name)) for name in self.procs.procs}
        self.loadgen_cpu = time.process_time()
        self.commands = self._commands()
        return self

    def stop(self, per: int) -> dict[str, Any]:
        """Usage since start(); Redis commands also per unit of work (`per`: events/tasks)."""
        wall = max(time.monotonic() - self.started, 1e-9)
        cpu = {name: round((cpu_seconds(self.procs.pid(name)) - before) / wall * 100, 1)
               for name, before in self.cpu.items() if name in self.procs.procs}
        cpu[LOADGEN] = round((time.process_time() - self.loadgen_cpu) / wall * 100, 1)
        after = self._commands()
        delta = {k: v - self.commands.get(k, 0) for k, v in after.items()
                 if v - self.commands.get(k, 0) > 0}
        total = sum(delta.values())
        top = sorted(delta.items(), key=lambda kv: -kv[1])[:12]
        return {"cpu_percent_of_one_core": cpu, "redis_commands": total,
                "redis_commands_per_unit": round(total / max(per, 1), 1),
                "redis_top_commands_per_unit": {k: round(v / max(per, 1), 2) for k, v in top}}


def median_round(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the median rate (of an even count, the slower middle one), and every
    round's rate in the order they ran."""
    middle = sorted(rounds, key=lambda r: r["per_s"])[(len(rounds) - 1) // 2]
    return {**middle, "rounds_per_s": [r["per_s"] for r in rounds]}


def load_summary(result: LoadResult, offered: float | None = None) -> dict[str, Any]:
    latencies = [s.latency for s in result.ok]
    return {
        "offered_per_s": offered,
        "requests": len(result.samples) + len(result.errors),
        "ok": len(result.ok),
        "non_2xx": dict(Counter(s.status for s in result.samples if not 200 <= s.status < 300)),
        "errors": len(result.errors),
        "first_errors": result.errors[:3],
        "not_sent": result.not_sent,
        "seconds": round(result.elapsed, 3),
        "per_s": round(result.throughput, 1),
        "p50_ms": ms(percentile(latencies, 50)),
        "p99_ms": ms(percentile(latencies, 99)),
        "max_ms": ms(max(latencies)) if latencies else None,
    }


def accepted_txids(result: LoadResult) -> dict[str, float]:
    """transaction ID -> wall clock its webhook was written, for new (not suppressed) events."""
    sent: dict[str, float] = {}
    for sample in result.ok:
        body = json.loads(sample.body)
        if not body.get("suppressed"):
            sent[body["transaction_id"]] = sample.sent
    return sent


# -- the run ----------------------------------------------------------------------------------

class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.plan = QUICK if args.quick else FULL
        self.procs = Procs()
        self.concurrency = args.concurrency
        self.api_workers = args.api_workers  # notifier api's processes, and the bare endpoint's
        self.redis_url = ""
        self.redis: redis.Redis | None = None
        self.profiles: dict[str, Any] = {}
        self.notes: list[str] = []

    def say(self, text: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {text}", flush=True)

    # -- baselines --------------------------------------------------------------------------

    @contextlib.contextmanager
    def baseline_server(self, kind: str, what: str, *extra: str) -> Iterator[Payloads]:
        """Start `python -m bench.baselines KIND`, warm it up, yield its payload source, stop it."""
        port, name = free_port(), f"bare-{kind}"
        self.procs.python(name, "-m", "bench.baselines", kind, "--port", str(port), *extra)
        wait_for(what, lambda: port_open(port), 20, lambda: self.procs.alive(name))
        payloads = Payloads(port)
        try:
            loadgen.run(lambda: loadgen.closed_loop("127.0.0.1", port, payloads.take(300),
                                                    connections=8, max_seconds=3))  # warm-up
            yield payloads
        finally:
            self.procs.stop(name)

    def bare_endpoint(self, payloads: Payloads) -> dict[str, Any]:
        """The bare endpoint at the steady rate; its saturation rounds run beside notifier's."""
        self.say("baseline: bare uvicorn endpoint")
        return {"steady": load_summary(self.steady(payloads.port, payloads), self.plan.steady_rate)}

    def saturation_round(self, payloads: Payloads) -> tuple[dict[str, Any], LoadResult]:
        assert self.redis is not None
        usage = Usage(self.procs, self.redis)
        sat = self.saturation(payloads.port, payloads, usage)
        used = usage.stop(len(sat.ok))
        aof = self.redis.info("persistence")  # a rewrite's fork competes with what is measured
        return {**load_summary(sat), "usage": used,
                "redis_aof": {k: aof.get(k) for k in ("aof_current_size", "aof_rewrites",
                                                      "aof_rewrite_in_progress")}}, sat

    def bare_fastapi(self) -> dict[str, Any]:
        """Context, not a target: what FastAPI itself reaches under the same generator."""
        self.say("context: bare FastAPI endpoint")
        with self.baseline_server("fastapi", "bare FastAPI endpoint") as payloads:
            sat = self.saturation(payloads.port, payloads)
        return {"saturation": load_summary(sat)}

    def noop_celery(self) -> dict[str, Any]:
        assert self.redis is not None
        self.procs.python("noop-worker", "-m", "bench.baselines", "celery", "--concurrency",
                          str(self.concurrency), env={"BENCH_REDIS_URL": self.redis_url})
        app = noop_app(self.redis_url)
        client = self.redis

        def drained() -> bool:
            return bool(client.llen(NOOP_QUEUE) == 0 and client.hlen("unacked") == 0)

        try:
            self.say(f"baseline: bare Celery no-op task, prefork concurrency {self.concurrency}")
            app.send_task(NOOP_TASK, args=["probe"], queue=NOOP_QUEUE)
            wait_for("no-op worker", drained, 60, lambda: self.procs.alive("noop-worker"), 0.05)
            self.procs.pause("noop-worker")
            n = self.plan.noop_tasks
            t0 = time.monotonic()
            with app.producer_or_acquire() as producer:
                for i in range(n):
                    app.send_task(NOOP_TASK, args=[str(i)], queue=NOOP_QUEUE, producer=producer)
            publish_s = time.monotonic() - t0
            usage = Usage(self.procs, client).start()
            started = time.monotonic()
            self.procs.resume("noop-worker")
            wait_for("no-op drain", drained, self.plan.drain_timeout,
                     lambda: self.procs.alive("noop-worker"), 0.01)
            took = time.monotonic() - started
            used = usage.stop(n)
        finally:
            self.procs.stop("noop-worker")
            app.close()
        return {"tasks": n, "seconds": round(took, 3), "per_s": round(n / took, 1),
                "publish_per_s": round(n / publish_s, 1), "usage": used}

    # -- load shapes -----------------------------------------------------------------------

    def steady(self, port: int, payloads: Payloads, rate: float | None = None,
               seconds: float | None = None) -> LoadResult:
        rate = rate or self.plan.steady_rate
        seconds = seconds or self.plan.steady_seconds
        requests = payloads.take(int(rate * seconds))
        return loadgen.run(lambda: loadgen.open_loop("127.0.0.1", port, requests, rate,
                                                     max_seconds=seconds + 2))

    def saturation(self, port: int, payloads: Payloads, usage: Usage | None = None) -> LoadResult:
        requests = payloads.take(self.plan.sat_max)
        if usage is not None:  # CPU from here: building the requests is the generator's work
            usage.start()
        return loadgen.run(lambda: loadgen.closed_loop(
            "127.0.0.1", port, requests, connections=self.plan.sat_connections,
            max_seconds=self.plan.sat_seconds))

    # -- notifier ---------------------------------------------------------------------------

    def config(self, fake_port: int | None) -> dict[str, Any]:
        high = {"rate": 1_000_000, "per": "1s", "burst": 1_000_000}  # limiter runs, never binds
        if fake_port is not None:
            sms: dict[str, Any] = {
                "provider": "aliyun", "endpoint": f"127.0.0.1:{fake_port}", "protocol": "http",
                "sign_name": "运维告警", "templates": {"alert": "SMS_100001",
                                                     "resolved": "SMS_100002"},
                "rate_limit": high}
        else:
            sms = {"provider": "sandbox", "rate_limit": high}
        # A pager gets many messages: its per-number bucket (2/min for Aliyun by default)
        # would hold them for a digest. It still runs on every send, it just never binds.
        sms["recipient_limits"] = [high]
        pagers = self.args.pagers
        recipients = {f"oncall{k}": {"phone": f"+86138{k:08d}"} for k in range(pagers)}
        # Each alert name pages one on-call number (alert name k -> pager k mod N), the first
        # matching route wins; with one pager, one route.
        routes: list[dict[str, Any]] = [{"match": {}, "to": ["oncall0"], "channels": ["sms"]}] \
            if pagers == 1 else [
            {"match": {"alertname": f"BenchAlert{k}"}, "to": [f"oncall{k % pagers}"],
             "channels": ["sms"]} for k in range(ALERT_NAMES)]
        return {"redis_url": self.redis_url, "locale": "en", "channels": {"sms": sms},
                "recipients": recipients, "routes": routes}

    def start_notifier(self, sink_port: int | None) -> int:
        port = free_port()
        cfg = self.procs.workdir / "notifier.yaml"
        data = self.config(sink_port)
        data["public_url"] = f"http://127.0.0.1:{port}"
        cfg.write_text(yaml.safe_dump(data, allow_unicode=True), "utf-8")
        env = {"NOTIFIER_CONFIG": str(cfg), "NOTIFIER_API_TOKEN": TOKEN,
               "NOTIFIER_CALLBACK_TOKEN": f"callback-{TOKEN}",
               "ALIBABA_CLOUD_ACCESS_KEY_ID": KEY_ID, "ALIBABA_CLOUD_ACCESS_KEY_SECRET": KEY_SECRET}
        me = ["-m", "notifier"]
        self.procs.python("api", *me, "api", "--port", str(port), "--workers", str(self.api_workers),
                          env=env)
        self.procs.python("worker", *me, "worker", "--concurrency", str(self.concurrency), env=env)
        self.procs.python("scheduler", *me, "scheduler", env=env)

        def ready() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1,
                                 trust_env=False).status_code == 200
            except httpx.HTTPError:
                return False

        def alive() -> None:
            self.procs.alive("api", "worker", "scheduler")

        wait_for("notifier api", ready, 30, alive)
        # The pool's processes exist (the warm-up then proves the whole path works).
        wait_for("notifier worker pool",
                 lambda: len(self.procs.descendants("worker")) >= self.concurrency, 30, alive)
        return port

    def wait_received(self, sink: Sink, expected: int, what: str,
                      timeout: float | None = None, note: bool = True) -> float | None:
        """Poll the provider side until `expected` messages arrived; the monotonic time they
        all had, or None when `timeout` (default: drain_timeout) ran out first."""
        deadline = time.monotonic() + (timeout or self.plan.drain_timeout)
        while time.monotonic() < deadline:
            self.procs.alive("api", "worker", "scheduler")
            if sink.count() >= expected:
                return time.monotonic()
            time.sleep(0.02)
        if note:
            self.notes.append(f"{what}: only {sink.count()} of {expected} deliveries arrived "
                              f"within {timeout or self.plan.drain_timeout:.0f}s")
        return None

    def backlog(self) -> dict[str, int]:
        assert self.redis is not None
        pipe = self.redis.pipeline(transaction=False)
        for queue in ALL_QUEUES:
            pipe.llen(queue)
        pipe.hlen("unacked")
        pipe.zcard("ntf:outbox")
        pipe.zcard("ntf:timers")
        values = pipe.execute()
        return dict(zip([*ALL_QUEUES, "unacked", "outbox", "timers"], values, strict=True))

    def purge_backlog(self) -> None:
        """Drop what is still queued (the fleet is paused), so the next phase starts clean."""
        assert self.redis is not None
        self.redis.delete(*ALL_QUEUES, "ntf:outbox", "ntf:timers")

    def quiesce(self, what: str) -> float:
        """Wait until no task is queued or running and nothing waits in outbox or timers."""
        started = time.monotonic()
        deadline = started + self.plan.drain_timeout
        while time.monotonic() < deadline:
            self.procs.alive("api", "worker", "scheduler")
            if not any(self.backlog().values()):
                return time.monotonic() - started
            time.sleep(0.05)
        self.notes.append(f"{what}: the fleet was still busy after {self.plan.drain_timeout:.0f}s "
                          f"({self.backlog()}); purged the queues")
        self.procs.pause("worker", "scheduler")
        self.purge_backlog()
        self.procs.resume("worker", "scheduler")
        return time.monotonic() - started

    def drain(self, sink: Sink, sent: dict[str, float], resumed_wall: float, usage: Usage,
              what: str) -> dict[str, Any]:
        """Deliveries/s while the resumed fleet works off `sent`, from provider receive times;
        measured until all arrived or for at most `drain_window` seconds."""
        window = self.plan.drain_window
        done = self.wait_received(sink, len(sent), what, timeout=window, note=False)
        cut = time.time()
        left = self.backlog()
        rows = [r for r in sink.received() if r.transaction_id in sent]
        used = usage.stop(len({r.delivery_id for r in rows}))
        self.procs.pause("worker", "scheduler")
        self.purge_backlog()
        self.procs.resume("worker", "scheduler")
        settle = self.quiesce(f"{what} (settling)")
        dupes = sum(n - 1 for n in Counter(r.delivery_id for r in rows).values() if n > 1)
        unique = len({r.delivery_id for r in rows})
        end = max((r.at for r in rows), default=cut) if done is not None else cut
        return {"events": len(sent), "received": unique, "duplicate_sends": dupes,
                "complete": done is not None, "seconds": round(end - resumed_wall, 3),
                "per_s": round(unique / max(end - resumed_wall, 1e-9), 1),
                "backlog_at_end": left, "settle_seconds": round(settle, 2), "usage": used}

    def e2e_latency(self, port: int, payloads: Payloads, sink: Sink) -> dict[str, Any]:
        sink.reset()
        load = self.steady(port, payloads, self.plan.e2e_rate, self.plan.e2e_seconds)
        sent = accepted_txids(load)
        self.wait_received(sink, len(sent), "end-to-end latency")
        rows = [r for r in sink.received() if r.transaction_id in sent]
        first: dict[str, float] = {}
        for r in rows:
            first[r.transaction_id] = min(first.get(r.transaction_id, r.at), r.at)
        lat = [at - sent[txid] for txid, at in first.items()]
        dupes = sum(n - 1 for n in Counter(r.delivery_id for r in rows).values() if n > 1)
        return {"offered_per_s": self.plan.e2e_rate, "events": len(sent), "received": len(first),
                "sample_note": "" if sink.name != "sandbox-outbox" or len(sent) <= 1000
                else "sandbox outbox keeps the newest 1000 entries only",
                "p50_ms": ms(percentile(lat, 50)), "p99_ms": ms(percentile(lat, 99)),
                "max_ms": ms(max(lat)) if lat else None, "duplicate_sends": dupes,
                "webhook": load_summary(load, self.plan.e2e_rate)}

    def fleet_metrics(self, port: int) -> dict[str, Any]:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10, trust_env=False).text
        wanted = ("notifier_scrape_duration_seconds", "notifier_deliveries_total",
                  "notifier_events_received_total", "notifier_end_to_end_latency_seconds_count",
                  "notifier_retries_total", "notifier_workers_alive")
        return {line.split(" ")[0]: float(line.rsplit(" ", 1)[1])
                for line in text.splitlines() if line.startswith(wanted)}

    def run_notifier(self, bare: Payloads) -> tuple[dict[str, Any], dict[str, Any]]:
        """notifier's phases -> (their figures, the bare endpoint's saturation rounds)."""
        sink: Sink
        fake_port: int | None = None
        if self.args.provider in ("auto", "fake"):
            try:
                fake_port = self.procs.start_fake_dysmsapi(KEY_ID, KEY_SECRET)
            except RuntimeError as exc:
                if self.args.provider == "fake":
                    raise
                self.notes.append(f"Dysmsapi fake did not start ({exc}); used the sandbox provider")
        port = self.start_notifier(fake_port)
        assert self.redis is not None
        sink = FakeSink(fake_port, self.redis) if fake_port is not None else SandboxSink(self.redis)
        self.say(f"notifier up on :{port}; SMS provider: {sink.name}; "
                 f"worker concurrency {self.concurrency}; api workers {self.api_workers}")
        payloads = Payloads(port)
        fleet = ("worker", "scheduler")
        out: dict[str, Any] = {"provider": sink.name}

        self.say("warm-up")
        sink.reset()
        warm = loadgen.run(lambda: loadgen.closed_loop("127.0.0.1", port, payloads.take(100),
                                                       connections=4, max_seconds=20))
        self.wait_received(sink, len(accepted_txids(warm)), "warm-up")

        self.say(f"ingest: {self.plan.steady_rate:.0f} webhooks/s offered for "
                 f"{self.plan.steady_seconds:.0f}s (worker fleet paused: the API alone)")
        sink.reset()
        self.procs.pause(*fleet)
        steady = self.steady(port, payloads)
        self.purge_backlog()  # the drain is measured after the saturation phase
        self.procs.resume(*fleet)
        out["ingest_steady"] = load_summary(steady, self.plan.steady_rate)
        self.quiesce("after steady ingest")

        self.say(f"ingest at saturation: {self.plan.sat_rounds} round(s) of the bare endpoint then "
                 f"notifier, {self.plan.sat_connections} connections, up to "
                 f"{self.plan.sat_seconds:.0f}s / {self.plan.sat_max} webhooks each (fleet paused)")
        sink.reset()
        self.procs.pause(*fleet)
        # With --workers N, uvicorn's parent only supervises: its children serve the requests.
        self.profile_start("api", self.procs.pid("api"), subprocesses=self.api_workers > 1)
        bare_rounds: list[dict[str, Any]] = []
        rounds: list[tuple[dict[str, Any], LoadResult]] = []
        for _ in range(self.plan.sat_rounds):
            bare_rounds.append(self.saturation_round(bare)[0])
            self.purge_backlog()  # an earlier round's: the drain below works off the last round's
            rounds.append(self.saturation_round(payloads))
        sat = rounds[-1][1]
        out["ingest_saturation"] = median_round([summary for summary, _ in rounds])
        self.say("saturation rounds (req/s): bare " + ", ".join(f"{r['per_s']:.0f}" for r in bare_rounds)
                 + "; notifier " + ", ".join(f"{r['per_s']:.0f}" for r, _ in rounds))
        self.profile_stop("api")
        self.say("end to end: the resumed fleet drains the backlog")
        self.profile_start("worker", self.procs.pid("worker"), subprocesses=True)
        usage = Usage(self.procs, self.redis).start()
        resumed = time.time()
        self.procs.resume(*fleet)
        out["e2e_throughput"] = self.drain(sink, accepted_txids(sat), resumed, usage,
                                           "drain after saturation ingest")
        self.profile_stop("worker")

        self.say(f"end to end latency: {self.plan.e2e_rate:.0f} events/s for "
                 f"{self.plan.e2e_seconds:.0f}s, whole fleet running")
        self.quiesce("before the latency phase")
        out["e2e_latency"] = self.e2e_latency(port, payloads, sink)
        out["fleet_metrics"] = self.fleet_metrics(port)
        return out, median_round(bare_rounds)

    # -- profiling (py-spy) -----------------------------------------------------------------

    def profile_start(self, name: str, pid: int, subprocesses: bool) -> None:
        if not self.args.profile:
            return
        out = self.procs.workdir / f"profile-{name}.txt"  # raw stacks stay with the run's logs
        argv = ["py-spy", "record", "-p", str(pid), "-r", "200", "-f", "raw", "-o", str(out),
                "--nonblocking", "-d", "600"]
        if subprocesses:
            argv.append("--subprocesses")
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(0.5)  # let it attach
        self.profiles[name] = (proc, out)

    def profile_stop(self, name: str) -> None:
        if name not in self.profiles:
            return
        proc, out = self.profiles.pop(name)
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        if not out.exists():
            self.notes.append(f"py-spy on {name} wrote nothing: {err.decode()[-300:]}")
            return
        self.profiles[f"{name}-top"] = summarise_profile(out)

    # -- everything --------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        self.say(f"work dir {self.procs.workdir}; mode {'quick' if self.args.quick else 'full'}")
        try:
            self.redis_url = self.procs.start_redis(self.args.appendfsync)
            self.redis = redis.Redis.from_url(self.redis_url)
            # The bare endpoint stays up (idle) until its saturation rounds, beside notifier's.
            with self.baseline_server("asgi", "bare uvicorn endpoint",
                                      "--workers", str(self.api_workers)) as bare:
                baseline_http = self.bare_endpoint(bare)
                baseline_fastapi = self.bare_fastapi()
                baseline_celery = self.noop_celery()
                measured, baseline_http["saturation"] = self.run_notifier(bare)
        finally:
            for name in [k for k in self.profiles if not k.endswith("-top")]:
                self.profile_stop(name)
            self.procs.stop_all()
        return {
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "mode": "quick" if self.args.quick else "full",
            "machine": machine(),
            "setup": {"worker_concurrency": self.concurrency, "api_workers": self.api_workers,
                      "redis_appendfsync": self.args.appendfsync, "pagers": self.args.pagers,
                      "plan": self.plan.__dict__},
            "code": code_version(),
            "baselines": {"bare_endpoint": baseline_http, "celery_noop": baseline_celery,
                          "bare_fastapi": baseline_fastapi},
            "notifier": measured,
            "profiles": {k.removesuffix("-top"): v for k, v in self.profiles.items()},
            "notes": self.notes,
        }


def summarise_profile(path: Path, top: int = 15) -> dict[str, Any]:
    """py-spy raw (collapsed stacks) -> top frames by own samples and by inclusive samples."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if f and not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count

    def rows(counter: Counter[str], keep: Callable[[str], bool]) -> list[dict[str, Any]]:
        return [{"frame": f, "pct": round(100 * n / max(total, 1), 1)}
                for f, n in counter.most_common() if keep(f)][:top]

    idle = re.compile(r"\b(select|poll|epoll|_worker|wait|sleep|run_forever|_run_once|accept|"
                      r"brpop|recv|read|get)\b.*\((selectors|threading|socket|asyncio|"
                      r"concurrent|queue)")
    return {"samples": total,
            "own": rows(own, lambda f: True),
            "own_busy": rows(own, lambda f: not idle.search(f)),
            "inclusive_notifier": rows(inclusive, lambda f: "notifier/" in f)}


def code_version() -> dict[str, Any]:
    """The commit measured, and whether the work tree differed from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=HERE.parent, capture_output=True, text=True,
                              check=False).stdout

    # Not stripped before splitting: a porcelain line starts with its status, " M" included.
    changed = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()]
    return {"commit": git("rev-parse", "--short", "HEAD").strip() or "unknown",
            "modified_files": changed}


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    redis_version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True,
                                   check=False).stdout.strip()
    versions = {}
    for dist in ("celery", "kombu", "redis", "uvicorn", "httptools", "uvloop", "fastapi", "pydantic"):
        try:
            from importlib.metadata import version  # noqa: PLC0415

            versions[dist] = version(dist)
        except Exception:
            versions[dist] = "?"
    return {"cpu": cpu, "cpus": os.cpu_count(), "memory": mem,
            "kernel": platform.release(), "python": platform.python_version(),
            "redis_server": redis_version, "packages": versions}


# -- the table ----------------------------------------------------------------------------------

def at_most(value: float | None, bound: float) -> bool:
    return value is not None and value <= bound


def table(result: dict[str, Any]) -> tuple[list[list[str]], bool]:
    b, n = result["baselines"], result["notifier"]
    rows: list[list[str]] = []
    all_met = True

    def add(figure: str, value: float | None, unit: str, base: float | None = None,
            target: str = "", met: bool | None = None) -> None:
        nonlocal all_met
        ratio = f"{value / base:.2f}x" if value is not None and base else ""
        verdict = "" if met is None else ("met" if met else "MISSED")
        if met is False:
            all_met = False
        rows.append([figure, "n/a" if value is None else f"{value:g} {unit}",
                     "" if base is None else f"{base:g} {unit}", ratio,
                     f"{target} {verdict}".strip()])

    sat, bsat = n["ingest_saturation"], b["bare_endpoint"]["saturation"]
    add("ingest at saturation (webhooks/s vs bare req/s)", sat["per_s"], "/s", bsat["per_s"],
        ">= 0.5x bare", sat["per_s"] >= 0.5 * bsat["per_s"])
    add("  context: bare FastAPI route at saturation", b["bare_fastapi"]["saturation"]["per_s"],
        "/s", bsat["per_s"])
    add("webhook p50 at saturation", sat["p50_ms"], "ms", bsat["p50_ms"])
    add("webhook p99 at saturation", sat["p99_ms"], "ms", bsat["p99_ms"])
    st, bst = n["ingest_steady"], b["bare_endpoint"]["steady"]
    add(f"webhook p50 at {st['offered_per_s']:g}/s", st["p50_ms"], "ms", bst["p50_ms"])
    add(f"webhook p99 at {st['offered_per_s']:g}/s", st["p99_ms"], "ms", bst["p99_ms"],
        "<= 50 ms", at_most(st["p99_ms"], 50) and st["ok"] == st["requests"])
    e2e, noop = n["e2e_throughput"], b["celery_noop"]
    add("end to end deliveries/s (vs no-op tasks/s)", e2e["per_s"], "/s", noop["per_s"],
        ">= 0.5x no-op", e2e["per_s"] >= 0.5 * noop["per_s"])
    lat = n["e2e_latency"]
    add(f"webhook->provider p50 at {lat['offered_per_s']:g}/s", lat["p50_ms"], "ms")
    add(f"webhook->provider p99 at {lat['offered_per_s']:g}/s", lat["p99_ms"], "ms", None,
        "<= 250 ms", at_most(lat["p99_ms"], 250) and lat["received"] == lat["events"] > 0)
    add(f"webhook p99 at {lat['offered_per_s']:g}/s, fleet running", lat["webhook"]["p99_ms"],
        "ms")
    dupes = e2e.get("duplicate_sends", 0) + lat.get("duplicate_sends", 0)
    add("duplicate provider sends", float(dupes), "", None, "0", dupes == 0)
    return rows, all_met


def render(rows: list[list[str]]) -> str:
    head = ["figure", "value", "baseline", "ratio", "target"]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(5)]

    def line(row: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()

    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short phases (under a minute)")
    parser.add_argument("--concurrency", type=int, default=os.cpu_count() or 2,
                        help="prefork children of the notifier worker and of the no-op baseline")
    # One API process per core, as deploy/systemd runs it; the bare endpoint gets as many.
    parser.add_argument("--api-workers", type=int, default=os.cpu_count() or 2,
                        help="processes of notifier api and of the bare endpoint (same for both)")
    parser.add_argument("--provider", choices=["auto", "fake", "sandbox"], default="auto",
                        help="SMS provider: the Dysmsapi fake process (auto: when it starts) "
                             "or the sandbox outbox")
    parser.add_argument("--appendfsync", choices=["always", "everysec", "no"], default="everysec",
                        help="redis-server AOF fsync policy (both notifier and baselines)")
    parser.add_argument("--profile", action="store_true",
                        help="py-spy the API during saturation ingest and the worker during drain")
    parser.add_argument("--pagers", type=int, default=ALERT_NAMES,
                        help=f"on-call numbers the events page, one per alert name mod N "
                             f"(default {ALERT_NAMES}: a fleet serving many teams; 1: every event "
                             "to one number, so no two events can share a provider request)")
    parser.add_argument("--output", type=Path, default=RESULTS / "latest.json")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    if not 1 <= args.pagers <= ALERT_NAMES:
        parser.error(f"--pagers: between 1 and {ALERT_NAMES} (one alert name pages one number)")
    started = time.monotonic()
    result = Bench(args).run()
    rows, all_met = table(result)
    result["table"] = [dict(zip(["figure", "value", "baseline", "ratio", "target"], r,
                                strict=True)) for r in rows]
    result["targets_met"] = all_met
    result["bench_seconds"] = round(time.monotonic() - started, 1)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", "utf-8")
    m = result["machine"]
    print(f"\nnotifier bench ({result['mode']}, {result['bench_seconds']}s) on {m['cpu']}, "
          f"{m['cpus']} CPUs, {m['memory']}, Python {m['python']}, {m['redis_server'][:40]}")
    print(f"SMS provider: {result['notifier']['provider']}; worker concurrency "
          f"{args.concurrency}; redis appendfsync {args.appendfsync}; {args.pagers} pager(s)\n")
    print(render(rows))
    for note in result["notes"]:
        print(f"note: {note}")
    for name, prof in result["profiles"].items():
        print(f"\nprofile {name} ({prof['samples']} samples), top own time (busy frames):")
        for row in prof["own_busy"][:10]:
            print(f"  {row['pct']:5.1f}%  {row['frame']}")
        print(f"profile {name}: notifier frames by inclusive time:")
        for row in prof["inclusive_notifier"][:10]:
            print(f"  {row['pct']:5.1f}%  {row['frame']}")
    print(f"\nwritten: {args.output}")
    return 1 if args.check and not all_met else 0


if __name__ == "__main__":
    sys.exit(main())
