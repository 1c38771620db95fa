"""The two baselines the bench measures notifier against, run as their own processes.

- A bare uvicorn endpoint: a trivial ASGI app that reads the request body and answers 200 with
  a small JSON body, served by `uvicorn.run` with the same options as `notifier api`
  (`python -m bench.baselines asgi --port N`).
- For context only (no target): a bare FastAPI app with one `async def` route that parses the
  JSON body and answers with JSONResponse — the framework's own ceiling on this machine
  (`python -m bench.baselines fastapi --port N`).
- A bare Celery no-op task on the same Redis, with notifier's own celeryconfig (acks_late,
  prefetch 1, ...) and the same prefork concurrency as the notifier worker
  (`python -m bench.baselines celery --concurrency N`, broker from BENCH_REDIS_URL).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from celery import Celery
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

import celeryconfig

NOOP_TASK = "bench.noop"
NOOP_QUEUE = "bench.noop"
_BODY = b'{"ok":true}'

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


async def bare_app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    more = True
    while more:  # read the whole body, as a real handler must
        message = await receive()
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(_BODY)).encode())]})
    await send({"type": "http.response.body", "body": _BODY})


def fastapi_app() -> FastAPI:
    app = FastAPI()

    @app.post("/v1/alertmanager")
    async def webhook(request: Request) -> JSONResponse:
        payload = json.loads(await request.body())
        return JSONResponse({"transaction_id": "bare", "alerts": len(payload.get("alerts", []))})

    return app


def noop_app(redis_url: str) -> Celery:
    app = Celery("bench", set_as_current=False)
    app.config_from_object(celeryconfig)
    app.conf.broker_url = redis_url
    app.conf.task_default_queue = NOOP_QUEUE

    @app.task(name=NOOP_TASK)  # type: ignore[untyped-decorator]
    def noop(_arg: str) -> None:
        return None

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    for name in ("asgi", "fastapi"):
        p = sub.add_parser(name)
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--workers", type=int, default=1)
    p = sub.add_parser("celery")
    p.add_argument("--concurrency", type=int, required=True)
    args = parser.parse_args()
    if args.what in ("asgi", "fastapi"):
        import uvicorn  # noqa: PLC0415

        options: dict[str, Any] = {"host": "127.0.0.1", "port": args.port, "log_level": "warning",
                                   "access_log": False, "proxy_headers": False}  # notifier api's
        if args.what == "asgi" and args.workers > 1:  # as `notifier api --workers N` runs
            uvicorn.run("bench.baselines:bare_app", workers=args.workers, **options)
        else:
            uvicorn.run(bare_app if args.what == "asgi" else fastapi_app(), **options)
    else:
        app = noop_app(os.environ["BENCH_REDIS_URL"])
        app.worker_main(["worker", "--concurrency", str(args.concurrency), "--pool", "prefork",
                         "-Q", NOOP_QUEUE, "-n", f"bench-noop-{os.getpid()}@%h",
                         "--loglevel", "WARNING", "--without-gossip", "--without-mingle"])


if __name__ == "__main__":
    main()
