"""The FastAPI application: ingest, tracking, health and metrics."""

from __future__ import annotations

import json
import os
from typing import Annotated, Any

import redis
from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import ValidationError

from notifier.api.auth import CallbackAuth, TokenAuth
from notifier.api.callbacks import callbacks_router
from notifier.api.drills import drills_router
from notifier.api.limits import BodySizeLimit
from notifier.api.operations import operations_router
from notifier.api.state import ApiState
from notifier.api.views import transaction_view
from notifier.config import Settings
from notifier.errors import BrokerUnavailable, IdempotencyConflict, InvalidEvent
from notifier.models import Source
from notifier.schemas import AlertmanagerWebhook, EventIn
from notifier.sources import alertmanager_dedup_key, from_alertmanager, from_event_in

# Routers of the other subsystems: each is make_router(state, auth, callback_auth) -> APIRouter.
ROUTERS = [operations_router, callbacks_router, drills_router]


def _field_errors(exc: ValidationError | RequestValidationError) -> list[str]:
    problems = []
    for item in exc.errors():
        loc = ".".join(str(p) for p in item["loc"] if p != "body") or "body"
        problems.append(f"{loc}: {item['msg']}")
    return problems


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    if not raw.strip():
        raise HTTPException(400, "request body is empty; expected JSON")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HTTPException(400, f"request body is not valid JSON: {exc}") from None


def create_app(settings: Settings) -> FastAPI:
    state = ApiState(settings)
    auth = TokenAuth(os.environ.get("NOTIFIER_API_TOKEN"))
    callback_auth = CallbackAuth(os.environ.get("NOTIFIER_CALLBACK_TOKEN"))
    app = FastAPI(title="notifier", version="0.1.0")
    app.state.notifier = state
    app.state.callback_auth = callback_auth
    app.state.auth = auth

    @app.exception_handler(BrokerUnavailable)
    async def _unavailable(_: Request, exc: BrokerUnavailable) -> JSONResponse:
        return JSONResponse({"detail": f"temporarily unavailable, retry: {exc}"}, status_code=503,
                            headers={"Retry-After": "1"})

    @app.exception_handler(redis.RedisError)
    async def _redis_down(_: Request, exc: redis.RedisError) -> JSONResponse:
        return JSONResponse({"detail": f"redis unavailable ({type(exc).__name__}), retry"},
                            status_code=503, headers={"Retry-After": "1"})

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _field_errors(exc)}, status_code=422)

    @app.exception_handler(InvalidEvent)
    async def _bad_event(_: Request, exc: InvalidEvent) -> JSONResponse:
        return JSONResponse({"detail": [str(exc)]}, status_code=422)

    @app.exception_handler(IdempotencyConflict)
    async def _conflict(_: Request, exc: IdempotencyConflict) -> JSONResponse:
        return JSONResponse({"detail": [str(exc)]}, status_code=422)

    @app.post("/v1/alertmanager", dependencies=[Depends(auth)])
    def alertmanager(payload: Annotated[dict[str, Any], Depends(_json_body)]) -> JSONResponse:
        if str(payload.get("version", "")) != "4":
            raise HTTPException(422, [f"version: unsupported Alertmanager webhook version "
                                      f"{payload.get('version')!r} (expected '4')"])
        try:
            webhook = AlertmanagerWebhook.model_validate(payload)
        except ValidationError as exc:
            raise HTTPException(422, _field_errors(exc)) from None
        accepted = state.intake.submit(from_alertmanager(webhook), Source.ALERTMANAGER,
                                       receiver=webhook.receiver,
                                       dedup_key=alertmanager_dedup_key(webhook))
        body: dict[str, Any] = {"transaction_id": accepted.transaction_id}
        if accepted.suppressed:
            body["suppressed"] = True
        return JSONResponse(body, status_code=200)

    @app.post("/v1/events", status_code=202, dependencies=[Depends(auth)])
    def events(payload: Annotated[Any, Depends(_json_body)],
               idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
               ) -> JSONResponse:
        try:
            event_in = EventIn.model_validate(payload)
        except ValidationError as exc:
            raise HTTPException(422, _field_errors(exc)) from None
        accepted = state.intake.submit(from_event_in(event_in), Source.API,
                                       idempotency_key=idempotency_key)
        return JSONResponse({"transaction_id": accepted.transaction_id}, status_code=202)

    @app.get("/v1/transactions/{txid}", dependencies=[Depends(auth)])
    def transaction(txid: str) -> dict[str, Any]:
        view = transaction_view(state.ledger, txid)
        if view is None:
            raise HTTPException(404, f"no transaction {txid!r} (unknown, or older than retention)")
        return view

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        try:
            state.redis.ping()
        except redis.RedisError as exc:
            return JSONResponse({"status": "unavailable", "redis": type(exc).__name__},
                                status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(state.registry), media_type=CONTENT_TYPE_LATEST)

    for make_router in ROUTERS:
        app.include_router(make_router(state, auth, callback_auth))
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    return app
