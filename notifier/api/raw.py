"""Answering at the ASGI level, for the routes that bypass FastAPI's request machinery."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
import redis
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.types import Send

from notifier.errors import BrokerUnavailable

RETRY_AFTER_SECONDS = "1"  # what a 503 asks the sender to wait


async def send_json(send: Send, status: int, payload: Any,
                    headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    body = orjson.dumps(payload)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


def unavailable_detail(exc: redis.RedisError | BrokerUnavailable) -> str:
    """The 503's detail when Redis cannot be reached: what failed, never where or with what."""
    if isinstance(exc, redis.RedisError):
        return f"redis unavailable ({type(exc).__name__}), retry"
    return f"temporarily unavailable, retry: {exc}"


def field_errors(exc: ValidationError | RequestValidationError) -> list[str]:
    """pydantic's errors as "field.path: message" lines (the body itself is "body")."""
    problems = []
    for item in exc.errors():
        loc = ".".join(str(p) for p in item["loc"] if p != "body") or "body"
        problems.append(f"{loc}: {item['msg'].removeprefix('Value error, ')}")  # our own raise
    return problems
