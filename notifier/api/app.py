"""The FastAPI application: ingest, tracking, health and metrics."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

import redis
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp

from notifier.api.auth import API_TOKEN_ENV, CALLBACK_TOKEN_ENV, CallbackAuth, TokenAuth, token_from_env
from notifier.api.callbacks import callbacks_router
from notifier.api.drills import drills_router
from notifier.api.ingest import IngestRoutes, document
from notifier.api.limits import BodySizeLimit
from notifier.api.operations import operations_router
from notifier.api.raw import RETRY_AFTER_SECONDS, field_errors, unavailable_detail
from notifier.api.state import ApiState
from notifier.api.views import transaction_view
from notifier.config import Settings, load_settings
from notifier.errors import BrokerUnavailable, IdempotencyConflict, InvalidEvent
from notifier.logs import configure_logging
from notifier.redis_health import check_eviction_policy

# Routers of the other subsystems: each is make_router(state, auth, callback_auth) -> APIRouter.
ROUTERS = [operations_router, callbacks_router, drills_router]


def create_app(settings: Settings) -> ASGIApp:
    """The API as uvicorn serves it: the ingest routes in front of the FastAPI app (they skip
    its per-request machinery, see notifier.api.ingest), both under one body-size limit."""
    app, state = fastapi_app(settings)
    return IngestRoutes(BodySizeLimit(app, max_bytes=settings.max_body_bytes), intake=state.intake,
                        auth=app.state.auth, batcher=state.accept_batcher,
                        max_bytes=settings.max_body_bytes)


def fastapi_app(settings: Settings) -> tuple[FastAPI, ApiState]:
    state = ApiState(settings)
    auth = TokenAuth(token_from_env(API_TOKEN_ENV))
    callback_auth = CallbackAuth(token_from_env(CALLBACK_TOKEN_ENV))

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(check_eviction_policy, state.redis)
        yield
        await state.accept_batcher.aclose()

    app = FastAPI(title="notifier", version="0.1.0", lifespan=lifespan)
    app.state.notifier = state
    app.state.callback_auth = callback_auth
    app.state.auth = auth

    @app.exception_handler(BrokerUnavailable)
    async def _unavailable(_: Request, exc: BrokerUnavailable) -> JSONResponse:
        return JSONResponse({"detail": unavailable_detail(exc)}, status_code=503,
                            headers={"Retry-After": RETRY_AFTER_SECONDS})

    @app.exception_handler(redis.RedisError)
    async def _redis_down(_: Request, exc: redis.RedisError) -> JSONResponse:
        return JSONResponse({"detail": unavailable_detail(exc)}, status_code=503,
                            headers={"Retry-After": RETRY_AFTER_SECONDS})

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI reads a body as JSON only when its Content-Type says so; otherwise the model
        # is handed the raw bytes, and the 422 would blame the body's shape.
        if any(e["loc"] == ("body",) and isinstance(e.get("input"), bytes) for e in exc.errors()):
            got = request.headers.get("content-type", "none")
            return JSONResponse({"detail": f"request body must be JSON sent with Content-Type: "
                                           f"application/json (got {got!r})"}, status_code=415)
        return JSONResponse({"detail": field_errors(exc)}, status_code=422)

    @app.exception_handler(InvalidEvent)
    async def _bad_event(_: Request, exc: InvalidEvent) -> JSONResponse:
        return JSONResponse({"detail": [str(exc)]}, status_code=422)

    @app.exception_handler(IdempotencyConflict)
    async def _conflict(_: Request, exc: IdempotencyConflict) -> JSONResponse:
        return JSONResponse({"detail": [str(exc)]}, status_code=422)

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

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document(get_openapi(title=app.title, version=app.version,
                                                      routes=app.routes))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app, state


def app_from_environment() -> ASGIApp:
    """The app of one of several API processes (`notifier api --workers N`): each is spawned
    afresh, so it reads the config named by NOTIFIER_CONFIG and sets up logging itself."""
    configure_logging(os.environ.get("NOTIFIER_LOG_LEVEL", "INFO"))
    return create_app(load_settings())
