"""The `notifier` command."""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis
import uvicorn
from celery.signals import task_received

import celeryconfig
from notifier import cli_drill
from notifier.api.app import create_app
from notifier.api.auth import check_tokens
from notifier.api.ingest_protocol import IngestHttpProtocol
from notifier.api.views import transaction_view
from notifier.celery_app import CeleryPublisher, make_celery
from notifier.channels.base import ChannelContext
from notifier.channels.sandbox import read_outbox
from notifier.cli_up import run_up
from notifier.client import as_event, intake_for, submit_retrying
from notifier.config import Settings, check_claim_lease, config_path, load_settings
from notifier.errors import NotifierError
from notifier.heartbeats import beat_forever
from notifier.ledger import Ledger
from notifier.logs import configure_logging
from notifier.models import TxStatus
from notifier.operations import BreakerControl, Unreplayable, replay_dead_letter
from notifier.periodic import periodic_jobs
from notifier.pipeline.reaper import reap
from notifier.redis_conn import connect
from notifier.redis_health import check_eviction_policy
from notifier.scheduler import Scheduler
from notifier.tasks_spec import ALL_QUEUES
from notifier.timeline import render_timeline
from notifier.worker.app import create_worker_app
from notifier.worker.watchdog import Watchdog, supervise

Handler = Callable[[argparse.Namespace, Settings], int]


def _redis(settings: Settings) -> redis.Redis:
    return connect(settings.redis_url, settings.redis_sentinel_master, socket_connect_timeout=2,
                   socket_timeout=10)


def cmd_check_config(args: argparse.Namespace, settings: Settings) -> int:
    check_tokens()  # the systemd units run this first, with the API's environment
    channels = ", ".join(f"{n} ({'/'.join(p.provider for p in c.providers)})"
                         for n, c in settings.channels.items())
    print(f"{config_path(args.config)}: OK — channels: {channels}; "
          f"{len(settings.recipients)} recipients, {len(settings.groups)} groups, "
          f"{len(settings.routes)} routes")
    return 0


def cmd_api(args: argparse.Namespace, settings: Settings) -> int:
    # No access log: callback URLs carry ?token=, which must never reach a log. No proxy
    # headers: nothing here reads the client's address, so uvicorn need not rewrite it from
    # X-Forwarded-For on every request (≈ 2 % of the API's time per webhook).
    # log_config=None: uvicorn's own lines (e.g. "Invalid HTTP request received.") go through
    # the root logger's JSON handler instead of its plain-text default config.
    options: dict[str, Any] = {"host": args.host, "port": args.port, "log_level": "warning",
                               "log_config": None, "access_log": False, "proxy_headers": False,
                               "http": IngestHttpProtocol}  # the class: uvicorn < 0.36 takes no path
    check_tokens()  # here, not in each worker process building the app: one clear error
    if args.workers > 1:  # each process builds the app from NOTIFIER_CONFIG (set by main)
        uvicorn.run("notifier.api.app:app_from_environment", factory=True, workers=args.workers,
                    **options)
    else:
        uvicorn.run(create_app(settings), **options)
    return 0


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    if not args.supervised:  # run the real worker as a child, and restart it if it dies
        return supervise([sys.executable, "-m", "notifier", "worker", "--supervised",
                          "--concurrency", str(args.concurrency), "--queues", args.queues,
                          "--loglevel", args.loglevel], dict(os.environ))
    app = create_worker_app(settings)
    check_eviction_policy(_redis(settings))
    name = f"notifier-{socket.gethostname()}-{os.getpid()}"
    queues = args.queues.split(",")
    threading.Thread(target=beat_forever, args=(_redis(settings), name, queues),
                     daemon=True).start()
    watchdog = Watchdog(_redis(settings), queues)
    task_received.connect(watchdog.task_received, weak=False)
    watchdog.start()
    # --quiet: no start-up banner, which is plain text among the JSON lines (jq stops at it)
    app.worker_main(["--quiet", "worker", "--concurrency", str(args.concurrency), "--pool", "prefork",
                     "-Q", args.queues, "-n", f"{name}@%h", "--loglevel", args.loglevel,
                     "--without-gossip", "--without-mingle"])
    return 0


def cmd_scheduler(args: argparse.Namespace, settings: Settings) -> int:
    client = _redis(settings)
    check_eviction_policy(client)
    publisher = CeleryPublisher(make_celery(settings.redis_url, settings.redis_sentinel_master))
    ledger = Ledger(client, settings.retention)

    def reaper() -> None:
        reap(ledger, publisher, stale_after=settings.reaper_after, lease=settings.claim_lease)

    jobs = [*periodic_jobs(settings, client, publisher), (min(settings.reaper_after / 2, 10.0), reaper)]
    Scheduler(client, publisher, interval=settings.scheduler_interval, periodic=jobs).run_forever()
    return 0


def cmd_send(args: argparse.Namespace, settings: Settings) -> int:
    event = as_event({
        "kind": args.kind, "title": args.title, "body": args.body, "severity": args.severity,
        "labels": dict(args.label), "to": args.to,
        "channels": args.channel,
    })
    accepted = submit_retrying(intake_for(settings), event, args.idempotency_key)
    print(accepted.transaction_id)
    return 0


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    ledger = Ledger(_redis(settings), settings.retention)
    deadline = time.monotonic() + args.wait
    view = transaction_view(ledger, args.txid)
    while view is not None and not _finished(TxStatus.of(view["status"])) and time.monotonic() < deadline:
        time.sleep(0.2)
        view = transaction_view(ledger, args.txid)
    if view is None:
        print(f"no transaction {args.txid!r}", file=sys.stderr)
        return 1
    print(json.dumps(view, ensure_ascii=False, indent=2) if args.json else render_timeline(view))
    return 0


def _finished(status: TxStatus | None) -> bool:
    """Nothing more to wait for: a terminal status, or one this version cannot read (None)."""
    return status is None or status.terminal


def cmd_outbox(args: argparse.Namespace, settings: Settings) -> int:
    context = ChannelContext(redis=_redis(settings))
    for channel in args.channel or list(settings.channels):
        for entry in read_outbox(context, channel, args.limit):
            shown = entry["params"] if channel == "sms" else entry["subject"]
            print(f"{channel:<5} {entry['to']}  {entry['kind']}  {json.dumps(shown, ensure_ascii=False)}")
            if args.verbose:
                print(f"      {entry['text']}")
    return 0


def cmd_breakers(args: argparse.Namespace, settings: Settings) -> int:
    control = BreakerControl(_redis(settings), settings)
    if args.action != "list":
        if args.name not in control.known():
            print(f"no breaker {args.name!r} (known: {', '.join(control.known())})", file=sys.stderr)
            return 2
        control.apply(args.name, args.action, args.by, args.reason)
    for status in control.list():
        print(f"{status.name:<24} {status.state.value:<14} failures={status.failures}"
              + (f" by={status.changed_by}" if status.changed_by else "")
              + (f" reason={status.reason}" if status.reason else ""))
    return 0


def cmd_deadletters(args: argparse.Namespace, settings: Settings) -> int:
    if args.action != "list" and not args.txid:
        print(f"deadletters {args.action}: name the transaction (TXID)", file=sys.stderr)
        return 2
    client = _redis(settings)
    ledger = Ledger(client, settings.retention)
    if args.action == "replay":
        try:
            new = replay_dead_letter(ledger, intake_for(settings), args.txid)
        except Unreplayable as exc:
            print(exc, file=sys.stderr)
            return 1
        if new is None:
            print(f"{args.txid!r} is not a dead letter", file=sys.stderr)
            return 1
        print(new)
        return 0
    if args.action == "drop":
        if not ledger.drop_dead_letter(args.txid):
            print(f"{args.txid!r} is not a dead letter", file=sys.stderr)
            return 1
        print(f"dropped {args.txid}")
        return 0
    for txid, at in ledger.dead_letters(args.limit):
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(at))}  {txid}")
    return 0


def _label(text: str) -> tuple[str, str]:
    """--label KEY=VALUE (the value may hold '='); argparse names the option in its error."""
    key, equals, value = text.partition("=")
    if not equals or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="notifier", description=__doc__)
    parser.add_argument("--config", help="config file (default: $NOTIFIER_CONFIG or ./notifier.yaml)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("api", help="run the HTTP API")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9095)
    p.add_argument("--workers", type=int, default=1,
                   help="API processes sharing the port (the API is stateless; one per core)")
    p = sub.add_parser("worker", help="run a Celery worker of this app")
    p.add_argument("--concurrency", type=int, default=os.cpu_count() or 2)
    p.add_argument("--queues", default=",".join(ALL_QUEUES))
    # Celery sets the root logger to this level, over configure_logging's: by default it is
    # NOTIFIER_LOG_LEVEL, as for every other process (the units set only that)
    p.add_argument("--loglevel", default=os.environ.get("NOTIFIER_LOG_LEVEL", "INFO"),
                   help="default: $NOTIFIER_LOG_LEVEL or INFO")
    p.add_argument("--supervised", action="store_true", help=argparse.SUPPRESS)
    sub.add_parser("scheduler", help="run the timer process (one per fleet; leader-elected)")
    p = sub.add_parser("up", help="api + worker + scheduler (+ private redis) in one process tree")
    p.add_argument("--sandbox", action="store_true", help="sandbox providers, demo recipients")
    p.add_argument("--demo", action="store_true", help="send a demo alert and show its timeline")
    p.add_argument("--exit-after-demo", action="store_true")
    p.add_argument("--port", type=int, default=9095)
    p.add_argument("--concurrency", type=int, default=2)
    p = sub.add_parser("send", help="send an event; prints its transaction ID")
    p.add_argument("--title", required=True)
    p.add_argument("--body", default="")
    p.add_argument("--kind", default="alert")
    p.add_argument("--severity", default="info")
    p.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", type=_label)
    p.add_argument("--to", action="append", default=[])
    p.add_argument("--channel", action="append", default=[])
    p.add_argument("--idempotency-key")
    p = sub.add_parser("status", help="a transaction's delivery timeline")
    p.add_argument("txid")
    p.add_argument("--json", action="store_true")
    p.add_argument("--wait", type=float, default=0.0, help="wait up to N s for a final status")
    sub.add_parser("check-config", help="validate the config file")
    p = sub.add_parser("outbox", help="messages the sandbox providers 'sent'")
    p.add_argument("--channel", action="append")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("-v", "--verbose", action="store_true")
    p = sub.add_parser("breakers", help="list or force circuit breakers")
    p.add_argument("action", nargs="?", default="list", choices=["list", "open", "close", "reset"])
    p.add_argument("name", nargs="?")
    p.add_argument("--by", default=os.environ.get("USER", "cli"))
    p.add_argument("--reason", default="")
    p = sub.add_parser("deadletters", help="list failed transactions, replay one or drop one")
    p.add_argument("action", nargs="?", default="list", choices=["list", "replay", "drop"])
    p.add_argument("txid", nargs="?")
    p.add_argument("--limit", type=int, default=50)
    cli_drill.add_parsers(sub)
    return parser


HANDLERS: dict[str, Handler] = {
    "api": cmd_api, "worker": cmd_worker, "scheduler": cmd_scheduler, "send": cmd_send,
    "status": cmd_status, "check-config": cmd_check_config, "outbox": cmd_outbox,
    "breakers": cmd_breakers, "deadletters": cmd_deadletters, **cli_drill.HANDLERS,
}
# The commands whose processes claim deliveries (or re-queue them when a claim lapses), and the
# check the systemd units run before them.
LEASE_HOLDERS = frozenset({"worker", "scheduler", "check-config"})


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(os.environ.get("NOTIFIER_LOG_LEVEL", "INFO"))
    if args.config:
        os.environ["NOTIFIER_CONFIG"] = args.config
    try:
        if args.command == "up":
            return run_up(args)
        settings = load_settings(config_path(args.config))
        if args.command in LEASE_HOLDERS:
            check_claim_lease(settings, celeryconfig.task_time_limit)
        return HANDLERS[args.command](args, settings)
    except NotifierError as exc:
        print(f"notifier: {exc}", file=sys.stderr)
        return 2
    except redis.RedisError as exc:
        print(f"notifier: redis unavailable: {exc}", file=sys.stderr)
        return 3
