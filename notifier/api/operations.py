"""Operator endpoints: circuit breakers and dead letters."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException
from pydantic import BaseModel, Field

from notifier.api.json_body import JSONBodyRoute
from notifier.api.state import ApiState
from notifier.operations import BreakerControl, Unreplayable, replay_dead_letter

Auth = Callable[..., None]


class BreakerCommand(BaseModel):
    action: Literal["open", "close", "reset"]
    by: str = Field(min_length=1, max_length=100)
    reason: str = Field(default="", max_length=500)


def operations_router(state: ApiState, auth: Auth, _callback_auth: Auth) -> APIRouter:
    router = APIRouter(dependencies=[Depends(auth)], route_class=JSONBodyRoute)
    control = BreakerControl(state.redis, state.settings)

    @router.get("/v1/breakers")
    def breakers() -> list[dict[str, Any]]:
        return [asdict(s) for s in control.list()]

    @router.post("/v1/breakers/{name}")
    def command(name: str, body: BreakerCommand) -> dict[str, Any]:
        if name not in control.known():
            raise HTTPException(404, f"no breaker {name!r} (known: {', '.join(control.known())})")
        return asdict(control.apply(name, body.action, body.by, body.reason))

    @router.get("/v1/deadletters")
    def deadletters(limit: Annotated[int, Field(ge=1, le=1000)] = 100) -> list[dict[str, Any]]:
        return [{"transaction_id": txid, "failed_at": at}
                for txid, at in state.ledger.dead_letters(limit)]

    @router.post("/v1/deadletters/{txid}/replay", status_code=202)
    def replay(txid: str) -> dict[str, str]:
        try:
            new_txid = replay_dead_letter(state.ledger, state.intake, txid)
        except Unreplayable as exc:
            raise HTTPException(409, str(exc)) from None
        if new_txid is None:
            raise HTTPException(404, f"{txid!r} is not a dead letter")
        return {"transaction_id": new_txid, "replay_of": txid}

    @router.delete("/v1/deadletters/{txid}", status_code=204)
    def drop(txid: str) -> None:
        if not state.ledger.drop_dead_letter(txid):
            raise HTTPException(404, f"{txid!r} is not a dead letter")

    return router
