"""POST /v1/alertmanager and POST /v1/events, served at the ASGI level.

These two routes are the ingest hot path, so they skip FastAPI's per-request machinery
(dependency solving, the threadpool a sync route runs in) which cost more than the work itself:
the body is validated straight from bytes (an Alertmanager webhook first by a msgspec decoder
derived from its pydantic model: notifier.api.first_pass), and the accept script (store + queue
the dispatch task, see notifier.ledger_accept) runs through the shared ScriptBatcher, which
accepts the events of one loop iteration in one script call. Everything else of the API stays
FastAPI. Behaviour is the API's contract: Bearer/Basic auth, 400 for a body that is not JSON,
422 naming the field, 413 past max_body_bytes (as BodySizeLimit answers for the rest of the
API), 503 with Retry-After when Redis is unreachable; the routes are documented in
/openapi.json.

A request is answered in three steps, each a plain call: `refuse` (on its headers), `submit`
(its body: the answer, or the accept call's result to come) and `finish` (that result). The
ASGI path below awaits between them; `notifier api` runs most ingest requests through the same
three from its HTTP protocol instead (notifier.api.ingest_protocol), without an ASGI cycle.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from pydantic import BaseModel, ValidationError
from starlette.types import ASGIApp, Receive, Scope, Send

from notifier.api.auth import CHALLENGE, UNAUTHORIZED, TokenAuth
from notifier.api.first_pass import Decode, first_pass
from notifier.api.limits import ClientGone, declared_too_large, read_body, reject_too_large, too_large_answer
from notifier.api.raw import RETRY_AFTER_SECONDS, Answer, field_errors, send_json, unavailable_detail
from notifier.api.script_batch import ScriptBatcher
from notifier.errors import BrokerUnavailable, IdempotencyConflict, InvalidEvent
from notifier.intake import Intake
from notifier.ledger_accept import AcceptCall
from notifier.models import Source
from notifier.records import AcceptResult
from notifier.schemas import AlertmanagerWebhook, EventIn, WebhookFields
from notifier.sources import alertmanager_dedup_key, from_event_in

IDEMPOTENCY_KEY_MAX = 200
_RETRY = [(b"retry-after", RETRY_AFTER_SECONDS.encode())]
_CHALLENGE = (CHALLENGE[0].lower().encode(), CHALLENGE[1].encode())


class BadBody(Exception):
    def __init__(self, status: int, detail: str | list[str]) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


@dataclass(frozen=True)
class RouteSpec:
    summary: str
    status: int  # answered when accepted
    model: type[BaseModel]
    decoder: Decode | None = None  # tried before the model (see notifier.api.first_pass)


SPECS = {
    "/v1/alertmanager": RouteSpec("Alertmanager webhook (v4)", 200, AlertmanagerWebhook,
                                  first_pass(AlertmanagerWebhook)),
    # Not /v1/events: EventIn's patterns cannot be derived, and its traffic is not the storm's.
    "/v1/events": RouteSpec("Generic event; honours Idempotency-Key", 202, EventIn),
}
Prepare = Callable[[Any, bytes, dict[bytes, bytes]], AcceptCall]  # (the model, its body, headers)


class IngestRoutes:
    """ASGI middleware: serves the ingest routes, passes everything else to the FastAPI app."""

    def __init__(self, app: ASGIApp, intake: Intake, auth: TokenAuth,
                 batcher: ScriptBatcher[AcceptCall, AcceptResult], max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.intake = intake
        self.auth = auth
        self.batcher = batcher
        self.prepare: dict[str, Prepare] = {"/v1/alertmanager": self._alertmanager,
                                             "/v1/events": self._event}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"] if scope["type"] == "http" else ""
        if path not in SPECS:
            await self.app(scope, receive, send)
            return
        if scope["method"] != "POST":
            await send_json(send, 405, {"detail": "Method Not Allowed"}, [(b"allow", b"POST")])
            return
        headers = dict(scope["headers"])
        too_large = declared_too_large(headers, self.max_bytes)
        refused = self.refuse(headers, too_large)
        if refused is not None:
            await send_json(send, *refused)
            return
        try:
            body = await read_body(receive, None if too_large is False else self.max_bytes)
        except ClientGone:
            return
        if body is None:
            await reject_too_large(send, self.max_bytes)
            return
        pending = self.submit(path, body, headers)
        if isinstance(pending, tuple):
            await send_json(send, *pending)
            return
        with contextlib.suppress(Exception):  # what it raised is answered by finish()
            await pending
        await send_json(send, *self.finish(path, pending))

    def refuse(self, headers: dict[bytes, bytes], too_large: bool | None) -> Answer | None:
        """The answer to a request refused on its headers alone (None: read its body)."""
        if too_large:
            return too_large_answer(self.max_bytes)
        if not self.auth.allows(headers.get(b"authorization", b"").decode("latin-1")):
            return 401, {"detail": UNAUTHORIZED}, [_CHALLENGE]
        return None

    def submit(self, path: str, body: bytes, headers: dict[bytes, bytes],
               ) -> Answer | asyncio.Future[AcceptResult]:
        """Validate the body and queue its accept call: the answer if it was refused, else the
        call's result to come (passed to finish())."""
        spec = SPECS[path]
        try:
            return self.batcher.run(self.prepare[path](_parse(spec, body), body, headers))
        except BadBody as exc:
            return exc.status, {"detail": exc.detail}, []
        except (InvalidEvent, IdempotencyConflict) as exc:
            return 422, {"detail": [str(exc)]}, []

    def finish(self, path: str, accepted_call: asyncio.Future[AcceptResult]) -> Answer:
        """The answer once the accept call is done."""
        try:
            accepted = self.intake.conclude(accepted_call.result())
        except (InvalidEvent, IdempotencyConflict) as exc:
            return 422, {"detail": [str(exc)]}, []
        # Redis unreachable (or its answer lost): the sender retries, and if the event was stored
        # after all, its dedup / idempotency key answers the retry with the same transaction.
        except (redis.RedisError, BrokerUnavailable) as exc:
            return 503, {"detail": unavailable_detail(exc)}, _RETRY
        answer: dict[str, Any] = {"transaction_id": accepted.transaction_id}
        if accepted.suppressed:
            answer["suppressed"] = True
        return SPECS[path].status, answer, []

    def _alertmanager(self, webhook: WebhookFields, body: bytes,
                      _headers: dict[bytes, bytes]) -> AcceptCall:
        if webhook.version != "4":
            raise BadBody(422, [f"version: unsupported Alertmanager webhook version "
                                f"{webhook.version!r} (expected '4')"])
        return self.intake.prepare_alertmanager(webhook, body, alertmanager_dedup_key(webhook))

    def _event(self, event_in: EventIn, _body: bytes, headers: dict[bytes, bytes]) -> AcceptCall:
        key = headers.get(b"idempotency-key")
        if key is not None and len(key) > IDEMPOTENCY_KEY_MAX:
            raise BadBody(422, [f"Idempotency-Key: longer than {IDEMPOTENCY_KEY_MAX} characters"])
        return self.intake.prepare(from_event_in(event_in), Source.API,
                                   idempotency_key=key.decode("latin-1") if key else None)


def _parse(spec: RouteSpec, body: bytes) -> Any:
    if spec.decoder is not None:
        try:
            return spec.decoder(body)
        # Refused (or nested past its recursion limit): the model decides, accepting a lax form
        # or answering the error.
        except (ValueError, RecursionError):
            pass
    if not body.strip():
        raise BadBody(400, "request body is empty; expected JSON")
    try:
        return spec.model.model_validate_json(body)
    except ValidationError as exc:
        invalid = [e for e in exc.errors() if e["type"] == "json_invalid"]
        if invalid:
            raise BadBody(400, f"request body is not valid JSON: {invalid[0]['msg']}") from None
        raise BadBody(422, field_errors(exc)) from None


def document(schema: dict[str, Any]) -> dict[str, Any]:
    """Add the ingest routes to the app's OpenAPI schema (FastAPI does not see them)."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    accepted = {"type": "object", "properties": {"transaction_id": {"type": "string"},
                                                 "suppressed": {"type": "boolean"}}}
    for path, spec in SPECS.items():
        body = spec.model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(body.pop("$defs", {}))
        components[spec.model.__name__] = body
        operation: dict[str, Any] = {
            "summary": spec.summary,
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{spec.model.__name__}"}}}},
            "responses": {
                str(spec.status): {"description": "accepted",
                                   "content": {"application/json": {"schema": accepted}}},
                **{code: {"description": text} for code, text in _ERRORS.items()},
            },
        }
        if path == "/v1/events":
            operation["parameters"] = [{"name": "Idempotency-Key", "in": "header", "required": False,
                                        "schema": {"type": "string", "maxLength": IDEMPOTENCY_KEY_MAX}}]
        schema.setdefault("paths", {})[path] = {"post": operation}
    return schema


_ERRORS = {"400": "body is not JSON", "401": "missing or wrong credentials",
           "413": "body too large", "422": "invalid field (named in detail)",
           "503": "Redis unreachable: nothing stored, retry after Retry-After"}
