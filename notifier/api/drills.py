"""Drill endpoints: create, status, start phases, confirm by API, finish, report."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Path, Query
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from notifier.api.json_body import JSONBodyRoute
from notifier.api.state import ApiState
from notifier.drills.markdown import render_markdown
from notifier.drills.model import DrillConflict, DrillInvalid, DrillNotFound, DrillSpec
from notifier.drills.report import build_report
from notifier.drills.service import DrillService
from notifier.scheduler import Timers

Auth = Callable[..., None]
DrillId = Annotated[str, Path(min_length=1, max_length=64)]


class PhaseStartIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    phase: str | None = Field(default=None, min_length=1, max_length=60)  # default: the next


class ConfirmIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    operator: str = Field(min_length=1, max_length=64)
    phase: str | None = Field(default=None, min_length=1, max_length=60)  # default: the live one
    by: str = Field(default="api", min_length=1, max_length=100)


@contextmanager
def _mapped() -> Iterator[None]:
    """Drill errors -> 404 / 409 / 422 with the message as the detail."""
    try:
        yield
    except DrillNotFound as exc:
        raise HTTPException(404, str(exc)) from None
    except DrillConflict as exc:
        raise HTTPException(409, str(exc)) from None
    except DrillInvalid as exc:
        raise HTTPException(422, [str(exc)]) from None


def drills_router(state: ApiState, auth: Auth, _callback_auth: Auth) -> APIRouter:
    router = APIRouter(dependencies=[Depends(auth)], route_class=JSONBodyRoute)
    svc = DrillService(state.settings, state.redis, state.intake, state.ledger,
                       Timers(state.redis))

    @router.post("/v1/drills", status_code=201)
    def create(spec: DrillSpec) -> dict[str, Any]:
        """Create a drill; `"start": true` also starts its first phase."""
        with _mapped():
            return svc.status(svc.create(spec).id)

    @router.get("/v1/drills")
    def recent(limit: Annotated[int, Query(ge=1, le=500)] = 50) -> list[dict[str, Any]]:
        out = []
        for drill_id in svc.store.recent(limit):
            drill = svc.store.drill(drill_id)
            if drill is not None:
                state_ = svc.store.state(drill_id)
                out.append({"id": drill.id, "name": drill.name, "created_at": drill.created_at,
                            "current_phase": int(state_.get("current", "-1")),
                            "finished": "finished_at" in state_})
        return out

    @router.get("/v1/drills/{drill_id}")
    def status(drill_id: DrillId) -> dict[str, Any]:
        with _mapped():
            return svc.status(drill_id)

    @router.post("/v1/drills/{drill_id}/phases")
    def start_phase(drill_id: DrillId, body: PhaseStartIn | None = None) -> dict[str, Any]:
        """Start the named phase, or the next one. The SMS go out within moments (a timer)."""
        with _mapped():
            index = svc.start_phase(drill_id, body.phase if body else None)
            return {**svc.status(drill_id), "started_phase": index}

    @router.post("/v1/drills/{drill_id}/confirm")
    def confirm(drill_id: DrillId, body: ConfirmIn) -> dict[str, Any]:
        """Confirm for an operator who cannot reply by SMS."""
        with _mapped():
            done = svc.confirm(drill_id, body.operator, body.phase, by=body.by)
            return {"operator": done.operator, "phase": done.phase, "confirmed_at": done.at,
                    "already_confirmed": not done.first}

    @router.post("/v1/drills/{drill_id}/finish")
    def finish(drill_id: DrillId) -> dict[str, Any]:
        with _mapped():
            svc.finish(drill_id)
            return svc.status(drill_id)

    @router.get("/v1/drills/{drill_id}/report", response_model=None)
    def report(drill_id: DrillId,
               format: Literal["json", "markdown"] = "json",
               ) -> dict[str, Any] | PlainTextResponse:
        with _mapped():
            data = build_report(svc, drill_id)
        if format == "markdown":
            return PlainTextResponse(render_markdown(data), media_type="text/markdown")
        return data

    return router
