"""`notifier drill ...` and `notifier sandbox reply ...` subcommands.

    notifier drill start --name "DR 2026-11" --operator alice --operator bob \\
        --phase "primary stopped=5m" --phase "traffic switched" --escalate carol --rounds 2
    notifier drill phase DRILL_ID [PHASE]        start the next (or the named) phase
    notifier drill confirm DRILL_ID OPERATOR     for an operator who cannot reply by SMS
    notifier drill status DRILL_ID [--json]
    notifier drill report DRILL_ID [--format markdown|json]
    notifier drill finish DRILL_ID
    notifier sandbox reply --from 13800138000 --text "123456 确认"
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx
from pydantic import ValidationError

from notifier.client import intake_for
from notifier.config import Settings, normalise_phone, parse_duration
from notifier.drills.markdown import render_markdown
from notifier.drills.model import DrillSpec, PhaseIn, human_duration
from notifier.drills.report import build_report
from notifier.drills.service import DrillService
from notifier.ledger import Ledger
from notifier.redis_conn import connect
from notifier.scheduler import Timers
from notifier.tokens import CALLBACK_TOKEN_ENV, token_from_env

Handler = Callable[[argparse.Namespace, Settings], int]
CHINA_TZ = timezone(timedelta(hours=8))


def _service(settings: Settings) -> DrillService:
    client = connect(settings.redis_url, settings.redis_sentinel_master, socket_connect_timeout=2,
                     socket_timeout=10)
    return DrillService(settings, client, intake_for(settings), Ledger(client, settings.retention),
                        Timers(client))


def _phase(text: str) -> PhaseIn:
    """'name' or 'name=5m' (the part after the last '=' only when it reads as a duration)."""
    name, sep, tail = text.rpartition("=")
    if sep and name.strip():
        try:
            return PhaseIn(name=name.strip(), deadline=parse_duration(tail))
        except ValueError:
            pass
    return PhaseIn(name=text.strip())


def _clock(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%H:%M:%S", time.localtime(ts))


def _print_status(view: dict[str, Any]) -> None:
    current = view["current_phase"]
    state = "finished" if view["finished_at"] else (
        "not started" if current is None else f"phase {current + 1}/{len(view['phases'])} live")
    print(f"drill {view['id']}  {view['name']!r}  {state}")
    for phase in view["phases"]:
        marks = []
        for op in phase["operators"]:
            done = op["confirmed_at"]
            marks.append(f"{op['operator']} " + (f"✓ {_clock(done)} ({op['confirmed_via']})"
                                                 if done else "…"))
        print(f"  {phase['index'] + 1}. {phase['name']:<24} started {_clock(phase['started_at'])}"
              f"  deadline {human_duration(phase['deadline'])}  " + "  ".join(marks))


def cmd_drill(args: argparse.Namespace, settings: Settings) -> int:
    svc = _service(settings)
    if args.action == "start":
        try:
            spec = DrillSpec(name=args.name, operators=args.operator,
                             phases=[_phase(p) for p in args.phase], escalation=args.escalate,
                             escalation_rounds=args.rounds, reply_code_ttl=args.reply_ttl,
                             severity=args.severity, start=not args.no_start)
        except ValidationError as exc:
            for e in exc.errors():
                print(f"notifier: {'.'.join(map(str, e['loc']))}: {e['msg']}", file=sys.stderr)
            return 2
        drill = svc.create(spec)
        print(drill.id)
        return 0
    if args.action == "phase":
        index = svc.start_phase(args.drill_id, args.phase)
        print(f"phase {index + 1} started: {svc.get(args.drill_id).phases[index].name}")
        return 0
    if args.action == "confirm":
        done = svc.confirm(args.drill_id, args.operator, args.phase, by=args.by)
        print(f"{done.operator}: {'confirmed' if done.first else 'already confirmed'} at "
              f"{_clock(done.at)}")
        return 0
    if args.action == "finish":
        svc.finish(args.drill_id)
        print("finished")
        return 0
    if args.action == "report":
        report = build_report(svc, args.drill_id)
        print(json.dumps(report, ensure_ascii=False, indent=2) if args.format == "json"
              else render_markdown(report), end="" if args.format == "markdown" else "\n")
        return 0
    view = svc.status(args.drill_id)
    if args.json:
        print(json.dumps(view, ensure_ascii=False, indent=2))
    else:
        _print_status(view)
    return 0


def sms_up_payload(phone: str, content: str, dest_code: str, sequence_id: str,
                   now: float | None = None) -> list[dict[str, str]]:
    """An SmsUp push as Aliyun sends it: number without '+', Beijing time, a sequence id."""
    at = datetime.fromtimestamp(time.time() if now is None else now, CHINA_TZ)
    return [{"phone_number": normalise_phone(phone).lstrip("+"),
             "send_time": at.strftime("%Y-%m-%d %H:%M:%S"), "content": content,
             "dest_code": dest_code, "sequence_id": sequence_id}]


def cmd_sandbox(args: argparse.Namespace, settings: Settings) -> int:
    try:
        body = sms_up_payload(args.from_, args.text, args.dest_code,
                              args.sequence_id or str(secrets.randbelow(10**9)))
    except ValueError as exc:
        print(f"notifier: --from: {exc}", file=sys.stderr)
        return 2
    url = f"{settings.public_url.rstrip('/')}/v1/callbacks/aliyun/sms-up"
    token = token_from_env(CALLBACK_TOKEN_ENV)  # as the API reads it
    try:
        response = httpx.post(url, json=body, params={"token": token} if token else None,
                              timeout=10)
    except httpx.HTTPError as exc:  # the URL carries the token: name only the error's type
        print(f"notifier: cannot reach the API at {settings.public_url}: {type(exc).__name__}",
              file=sys.stderr)
        return 3
    print(f"SmsUp from {body[0]['phone_number']}: HTTP {response.status_code} {response.text}")
    return 0 if response.status_code == 200 else 1


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    drill = sub.add_parser("drill", help="disaster-recovery drills: start, phase, confirm, "
                                         "status, report, finish")
    actions = drill.add_subparsers(dest="action", required=True)
    p = actions.add_parser("start", help="create a drill and start its first phase")
    p.add_argument("--name", required=True)
    p.add_argument("--operator", action="append", required=True, help="recipient or group")
    p.add_argument("--phase", action="append", required=True, metavar="NAME[=DEADLINE]")
    p.add_argument("--escalate", action="append", default=[], help="recipient or group")
    p.add_argument("--rounds", type=int, help="escalation rounds (default: from the config)")
    p.add_argument("--reply-ttl", help="reply code lifetime, e.g. 72h (default: config)")
    p.add_argument("--severity", default="critical")
    p.add_argument("--no-start", action="store_true", help="create only")
    p = actions.add_parser("phase", help="start the next phase (or the named one)")
    p.add_argument("drill_id")
    p.add_argument("phase", nargs="?")
    p = actions.add_parser("confirm", help="confirm for an operator (no SMS reply needed)")
    p.add_argument("drill_id")
    p.add_argument("operator")
    p.add_argument("--phase")
    p.add_argument("--by", default=os.environ.get("USER", "cli"))
    p = actions.add_parser("status", help="phases and confirmations")
    p.add_argument("drill_id")
    p.add_argument("--json", action="store_true")
    p = actions.add_parser("report", help="the timed drill report")
    p.add_argument("drill_id")
    p.add_argument("--format", choices=["markdown", "json"], default="markdown")
    p = actions.add_parser("finish", help="end the drill (codes stop confirming)")
    p.add_argument("drill_id")
    sandbox = sub.add_parser("sandbox", help="play Aliyun locally")
    what = sandbox.add_subparsers(dest="action", required=True)
    p = what.add_parser("reply", help="post an SmsUp push to the callback, as Aliyun would")
    p.add_argument("--from", dest="from_", required=True, metavar="PHONE")
    p.add_argument("--text", required=True)
    p.add_argument("--dest-code", default="0")
    p.add_argument("--sequence-id", help="Aliyun's id of the reply (default: random)")


HANDLERS: dict[str, Handler] = {"drill": cmd_drill, "sandbox": cmd_sandbox}
