"""Answering at the ASGI level, for the routes that bypass FastAPI's request machinery."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import orjson
import redis
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.types import Send

from notifier.errors import BrokerUnavailable

RETRY_AFTER_SECONDS = "1"  # what a 503 asks the sender to wait
UNAVAILABLE_LOG_EVERY = 10.0
_last_said = [-UNAVAILABLE_LOG_EVERY]  # when a 503's reason was last logged (monotonic)
log = logging.getLogger(__name__)


Header = tuple[bytes, bytes]
# An answer: status, JSON payload, headers beyond content-type and content-length.
Answer = tuple[int, Any, Sequence[Header]]


def json_response(payload: Any, headers: Sequence[Header] = ()) -> tuple[list[Header], bytes]:
    """An answer's headers and body, as both ways of answering send them (ASGI: send_json; the
    HTTP protocol: notifier.api.ingest_protocol)."""
    body = orjson.dumps(payload)
    return [(b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()), *headers], body


async def send_json(send: Send, status: int, payload: Any, headers: Sequence[Header] = ()) -> None:
    head, body = json_response(payload, headers)
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


def unavailable_detail(exc: redis.RedisError | BrokerUnavailable) -> str:
    """The 503's detail when Redis cannot be reached: what failed, never where or with what.
    Also said in the log, once per UNAVAILABLE_LOG_EVERY s per process: the reason for the
    503s (a full Redis answers reads, so nothing else says it) without a line per request."""
    if isinstance(exc, redis.RedisError):
        detail = f"redis unavailable ({type(exc).__name__}), retry"
    else:
        detail = f"temporarily unavailable, retry: {exc}"
    now = time.monotonic()
    if now - _last_said[0] >= UNAVAILABLE_LOG_EVERY:
        _last_said[0] = now
        # Redis' own words (e.g. "OOM command not allowed..."): a script's refusal is a plain
        # ResponseError, whose name alone does not say why. No secret is in them.
        log.warning("answering 503: %s: %s", detail, str(exc)[:200])
    return detail


def field_errors(exc: ValidationError | RequestValidationError) -> list[str]:
    """pydantic's errors as "field.path: message" lines (the body itself is "body")."""
    problems = []
    for item in exc.errors():
        loc = ".".join(str(p) for p in item["loc"] if p != "body") or "body"
        problems.append(f"{loc}: {item['msg'].removeprefix('Value error, ')}")  # our own raise
    return problems
