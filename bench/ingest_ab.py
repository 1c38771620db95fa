"""Ingest A/B: saturation rounds of notifier's API at two (or more) checkouts, interleaved.

    git worktree add /tmp/before <commit>
    python -m bench.ingest_ab before=/tmp/before after=. [--cycles 8] [--requests 20000]

One full bench run reads the ingest ratio within about ±0.08 on a 2-vCPU VM (bench/RESULTS.md),
more than most changes move it. This compares checkouts cycle by cycle instead: every cycle
runs one closed-loop burst at the bare endpoint, then one at each checkout's `notifier api`,
all started once beside one redis-server, so the machine's drift falls on all of them alike.
It prints each cycle's rates and CPU per request (server, Redis, load generator), then the
medians and each checkout's ratio to the bare burst of the same cycle. The API only: no worker
runs, so the queued dispatch messages just accumulate in the private Redis.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from bench import loadgen
from bench.procs import Procs, cpu_seconds, port_open, wait_for
from bench.run import TOKEN, Payloads
from tests.support.servers import free_port

BARE = "bare"


@dataclass
class Side:
    name: str
    port: int
    payloads: Payloads
    rates: list[float] = field(default_factory=list)
    cpu_us: list[tuple[float, float, float]] = field(default_factory=list)  # server, redis, loadgen

    def median_us(self, i: int) -> float:
        return statistics.median(c[i] for c in self.cpu_us)


def start_api(procs: Procs, name: str, repo: Path, redis_url: str, workers: int) -> int:
    port = free_port()
    config = procs.workdir / f"{name}.yaml"
    config.write_text(yaml.safe_dump({
        "redis_url": redis_url, "locale": "en", "public_url": f"http://127.0.0.1:{port}",
        "channels": {"sms": {"provider": "sandbox"}},
        "recipients": {"oncall": {"phone": "+8613800000000"}},
        "routes": [{"match": {}, "to": ["oncall"], "channels": ["sms"]}],
    }), "utf-8")
    procs.python(name, "-m", "notifier", "api", "--port", str(port), "--workers", str(workers),
                 env={"PYTHONPATH": str(repo.resolve()), "NOTIFIER_CONFIG": str(config),
                      "NOTIFIER_API_TOKEN": TOKEN, "NOTIFIER_CALLBACK_TOKEN": f"callback-{TOKEN}"})
    return port


def burst(procs: Procs, side: Side, requests: int, connections: int) -> str:
    batch = side.payloads.take(requests)
    before = {name: cpu_seconds(procs.pid(name)) for name in (side.name, "redis")}
    generator = time.process_time()
    result = loadgen.run(lambda: loadgen.closed_loop("127.0.0.1", side.port, batch,
                                                     connections=connections, max_seconds=60))
    generator = time.process_time() - generator
    ok = max(len(result.ok), 1)
    used = {name: (cpu_seconds(procs.pid(name)) - was) / ok * 1e6 for name, was in before.items()}
    side.rates.append(result.throughput)
    side.cpu_us.append((used[side.name], used["redis"], generator / ok * 1e6))
    errors = f", {len(result.errors)} errors" if result.errors else ""
    return (f"{side.name} {result.throughput:,.0f}/s ({used[side.name]:.0f} + {used['redis']:.0f}"
            f" + {generator / ok * 1e6:.0f} µs{errors})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkouts", nargs="+", metavar="NAME=PATH",
                        help="a name and the checkout (e.g. a git worktree) whose API to run")
    parser.add_argument("--cycles", type=int, default=8)
    parser.add_argument("--requests", type=int, default=20000, help="per burst")
    parser.add_argument("--connections", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2, help="processes per server")
    args = parser.parse_args()
    procs = Procs()
    try:
        redis_url = procs.start_redis("everysec")
        bare_port = free_port()
        procs.python(BARE, "-m", "bench.baselines", "asgi", "--port", str(bare_port),
                     "--workers", str(args.workers))
        sides = [Side(BARE, bare_port, Payloads(bare_port))]
        for spec in args.checkouts:
            name, _, path = spec.partition("=")
            if not path or name in (BARE, "redis"):
                parser.error(f"{spec!r}: expected NAME=PATH, NAME not {BARE!r} or 'redis'")
            port = start_api(procs, name, Path(path), redis_url, args.workers)
            sides.append(Side(name, port, Payloads(port)))
        for side in sides:
            wait_for(side.name, lambda port=side.port: port_open(port), 30,  # type: ignore[misc]
                     lambda name=side.name: procs.alive(name))  # type: ignore[misc]
            burst(procs, side, 3000, 16)  # warm-up
            side.rates.clear()
            side.cpu_us.clear()
        print("per burst: rate (CPU per request: server + Redis + load generator)")
        for cycle in range(args.cycles):
            line = [burst(procs, side, args.requests, args.connections) for side in sides]
            print(f"cycle {cycle + 1}: " + "; ".join(line), flush=True)
    finally:
        procs.stop_all()
    bare = sides[0]
    for side in sides:
        ratio = ""
        if side is not bare:
            ratios = [r / b for r, b in zip(side.rates, bare.rates, strict=True)]
            ratio = (f"; ratio to bare, per cycle: median {statistics.median(ratios):.2f}, "
                     f"{min(ratios):.2f}–{max(ratios):.2f}")
        print(f"{side.name}: median {statistics.median(side.rates):,.0f}/s; µs per request: server "
              f"{side.median_us(0):.0f}, Redis {side.median_us(1):.0f}, load generator "
              f"{side.median_us(2):.0f}{ratio}")


if __name__ == "__main__":
    main()
