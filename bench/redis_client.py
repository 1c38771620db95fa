"""Client CPU per Redis round trip with the installed redis-py (why pyproject pins it <7.2).

    python -m bench.redis_client [--port N]     # starts its own redis-server unless --port

Prints µs of this process's CPU per call for the shapes the worker uses: a single command, a
one-command pipeline, and a MULTI/EXEC of 10 commands (a delivery's record is one of ~20). To
compare versions, unpack another redis-py wheel and put it first on PYTHONPATH:

    pip download redis==8.1.0 --no-deps -d /tmp/r && cd /tmp/r && python -m zipfile -e redis-*.whl v8
    PYTHONPATH=/tmp/r/v8 python -m bench.redis_client
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import redis

from tests.support.servers import RedisServer


def cpu_us(call: Callable[[], object], n: int) -> float:
    for _ in range(200):
        call()
    started = time.process_time()
    for _ in range(n):
        call()
    return (time.process_time() - started) / n * 1e6


def measure(port: int, n: int) -> dict[str, float]:
    client = redis.Redis(port=port)
    client.hset("bench:h", mapping={f"f{i}": "v" * 20 for i in range(20)})

    def one_pipeline() -> None:
        pipe = client.pipeline(transaction=False)
        pipe.hgetall("bench:h")
        pipe.execute()

    def multi_of_ten() -> None:
        pipe = client.pipeline(transaction=True)
        for _ in range(10):
            pipe.hincrbyfloat("bench:m", "f", 1.0)
        pipe.execute()

    return {"GET": cpu_us(lambda: client.get("bench:x"), n),
            "pipeline of 1": cpu_us(one_pipeline, n),
            "MULTI of 10": cpu_us(multi_of_ten, n)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, help="an existing redis-server (default: start one)")
    parser.add_argument("-n", type=int, default=5000, help="calls per figure")
    args = parser.parse_args()
    server = None
    if args.port is None:
        server = RedisServer(appendonly=False)
        server.start()
    try:
        figures = measure(args.port if server is None else server.port, args.n)
    finally:
        if server is not None:
            server.stop()
    print(f"redis-py {redis.__version__}: client CPU per call, µs")
    for name, value in figures.items():
        print(f"  {name:<14} {value:6.0f}")


if __name__ == "__main__":
    main()
