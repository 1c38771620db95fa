"""What SendSms batching saves on a team page: `python -m bench.sms_batching [--people N]`.

An event paging N people by SMS, driven in-process through the real pipeline (dispatch, then
the deliver tasks it queues, without Celery), the real Aliyun SDK, a private redis-server and
the Dysmsapi fake in its own process (so its CPU is not counted). Baseline, in the same run:
the same pages with batching off (the provider's max_batch forced to 1: one request per
recipient). Prints the worker-side CPU and wall time per page and per delivery, and the
SendSms requests the fake saw.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from typing import Any

import httpx
import redis

from notifier.models import Event, Source
from tests.support.inline import InlineFleet
from tests.support.servers import RedisServer

KEY_ID, SECRET = "LTAI-bench-batching", "bench-batching-secret"
HIGH = {"rate": 1_000_000, "per": "1s", "burst": 1_000_000}  # limits on, never in the way


def config(endpoint: str, people: int) -> dict[str, Any]:
    recipients = {f"oncall{i}": {"phone": f"+86138001{i:05d}"} for i in range(people)}
    return {"locale": "en",
            "channels": {"sms": {"provider": "aliyun", "endpoint": endpoint, "protocol": "http",
                                 "sign_name": "运维告警", "templates": {"alert": "SMS_100001"},
                                 "rate_limit": HIGH, "recipient_limits": [HIGH]}},
            "recipients": recipients,
            "routes": [{"match": {}, "to": list(recipients), "channels": ["sms"]}]}


def send_requests(fake_url: str) -> int:
    return int(httpx.get(f"{fake_url}/_fake/stats").json()["requests"].get("SendSms", 0))


def run(redis_url: str, fake_url: str, cfg: dict[str, Any], batched: bool, pages: int
        ) -> dict[str, float]:
    fleet = InlineFleet(redis_url, cfg, {"ALIBABA_CLOUD_ACCESS_KEY_ID": KEY_ID,
                                         "ALIBABA_CLOUD_ACCESS_KEY_SECRET": SECRET})
    try:
        provider = fleet.deps.providers["sms"][0]
        if not batched:
            provider.limits = dataclasses.replace(provider.limits, max_batch=1)  # type: ignore[misc]
        for i in range(20):  # warm-up: connections, templates, scripts
            fleet.intake.submit(Event(kind="alert", title=f"warm-up {i}"), Source.API)
        fleet.drain()
        before = send_requests(fake_url)
        fleet.outcomes.clear()
        for i in range(pages):
            fleet.intake.submit(Event(kind="alert", title=f"page {i}", body="disk full"), Source.API)
        cpu, wall = time.process_time(), time.perf_counter()
        fleet.drain()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        requests = send_requests(fake_url) - before
        sent = sum(1 for _, outcome in fleet.outcomes if outcome == "sent")
        return {"cpu_ms_per_page": cpu / pages * 1000, "wall_ms_per_page": wall / pages * 1000,
                "cpu_ms_per_delivery": cpu / max(sent, 1) * 1000, "deliveries": sent,
                "sendsms_requests": requests}
    finally:
        fleet.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--people", type=int, default=3)
    parser.add_argument("--pages", type=int, default=300)
    args = parser.parse_args()
    server = RedisServer(appendonly=False)
    server.start()
    fake = subprocess.Popen([sys.executable, "-m", "tests.fakes.dysmsapi", "--port", "0",
                             "--access-key-id", KEY_ID, "--access-key-secret", SECRET],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert fake.stdout is not None
        fake_url = str(json.loads(fake.stdout.readline())["url"])
        cfg = config(fake_url.removeprefix("http://"), args.people)
        results = {}
        for batched in (False, True):
            redis.Redis(port=server.port).flushall()
            results[batched] = run(server.url, fake_url, cfg, batched, args.pages)
        print(f"SMS page to {args.people} people, {args.pages} pages, worker side only "
              "(the fake runs in its own process)")
        print(f"{'':34s}{'cpu/page':>11s}{'wall/page':>11s}{'cpu/delivery':>14s}{'SendSms':>9s}")
        for batched, label in ((False, "one request per recipient (base)"), (True, "batched")):
            r = results[batched]
            print(f"{label:34s}{r['cpu_ms_per_page']:9.2f}ms{r['wall_ms_per_page']:9.2f}ms"
                  f"{r['cpu_ms_per_delivery']:12.2f}ms{r['sendsms_requests']:9.0f}")
        base, new = results[False]["cpu_ms_per_page"], results[True]["cpu_ms_per_page"]
        print(f"batched / base CPU per page: {new / base:.2f}x")
    finally:
        fake.terminate()
        fake.wait(10)
        server.close()


if __name__ == "__main__":
    main()
