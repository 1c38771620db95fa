"""Aliyun HTTP batch pushes: delivery receipts (SmsReport) and replies (SmsUp).

Store first, answer after: Aliyun re-pushes a non-200 (after 1, 5 and 10 minutes, then drops
it), so a storage failure must answer 5xx (the app turns a RedisError into 503), and a stored
push 200 even if publishing the apply task fails (the scheduler notices stored, unapplied
records). Callbacks carry `?token=` (Aliyun cannot send headers); it is never echoed.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable
from typing import Annotated, Any

import redis
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import JSONResponse

from notifier.api.state import ApiState
from notifier.drills.replies import parse_replies, reply_inbox, store_replies
from notifier.errors import BrokerUnavailable
from notifier.inbox import Checked, InvalidPush
from notifier.receipts import parse_reports, receipt_inbox, store_reports
from notifier.tasks_spec import APPLY_RECEIPTS, APPLY_REPLIES, CONTROL_QUEUE

Auth = Callable[..., None]
ACK = {"code": 0, "msg": "接收成功"}
log = logging.getLogger(__name__)


async def _payload(request: Request) -> Any:
    raw = await request.body()
    if not raw.strip():
        raise HTTPException(400, ["body: empty; expected a JSON array"])
    try:
        return json.loads(raw)
    # JSONDecodeError and UnicodeDecodeError are ValueErrors, as is an integer past Python's
    # 4300-digit limit; nesting past the parser's recursion limit raises RecursionError.
    except (ValueError, RecursionError) as exc:
        problem = str(exc) if isinstance(exc, ValueError) else "nested too deeply"
        raise HTTPException(400, [f"body: not valid JSON: {problem}"]) from None


def callbacks_router(state: ApiState, _auth: Auth, callback_auth: Auth) -> APIRouter:
    router = APIRouter(dependencies=[Depends(callback_auth)])
    receipts = receipt_inbox(state.redis, state.settings.retention)
    replies = reply_inbox(state.redis, state.settings.retention)

    def publish(task: str) -> None:
        try:
            state.publisher.publish(task, [], CONTROL_QUEUE)
        except BrokerUnavailable:
            log.warning("stored a push but could not publish %s; the scheduler will", task)

    def count(metric: str, amount: int, **labels: str) -> None:
        if amount:
            # Counted after storing: a lost count must not turn into a 503 that makes Aliyun
            # push again what is stored already.
            with contextlib.suppress(redis.RedisError):
                state.metrics.inc(metric, float(amount), into=None, **labels)

    def screen(checked: Checked[Any], kind: str, metric: str, **labels: str) -> None:
        """Log and count the push's invalid records (they are dropped); refuse the push if
        nothing in it was valid."""
        for bad in checked.invalid:
            log.warning("%s push: record [%d] (from %s) dropped: %s", kind, bad.index,
                        bad.sender or "?", "; ".join(bad.problems))
        count(metric, len(checked.invalid), result="invalid", **labels)
        if checked.refused:
            # Nothing good to lose by a 4xx, and a push with no readable record at all means
            # a systematic fault (Aliyun changed its format, the report URL was set as the
            # reply URL, ...): answering 422 names the fields and makes the failures show in
            # Aliyun's push console instead of being acknowledged silently. Aliyun re-pushes it
            # (each re-push counted and logged again), then drops it, as it would anyway.
            raise HTTPException(422, checked.problems)

    @router.post("/v1/callbacks/aliyun/sms-report")
    def sms_report(payload: Annotated[Any, Depends(_payload)]) -> JSONResponse:
        try:
            checked = parse_reports(payload)
        except InvalidPush as exc:
            raise HTTPException(422, exc.problems) from None
        new, duplicates = store_reports(receipts, checked.records)
        screen(checked, "SmsReport", "notifier_receipts", channel="sms")
        count("notifier_receipts", duplicates, channel="sms", result="duplicate")
        if new:
            publish(APPLY_RECEIPTS)
        return JSONResponse(ACK)

    @router.post("/v1/callbacks/aliyun/sms-up")
    def sms_up(payload: Annotated[Any, Depends(_payload)]) -> JSONResponse:
        try:
            checked = parse_replies(payload)
        except InvalidPush as exc:
            raise HTTPException(422, exc.problems) from None
        new, _ = store_replies(replies, checked.records)
        screen(checked, "SmsUp", "notifier_replies")
        if new:
            publish(APPLY_REPLIES)
        return JSONResponse(ACK)

    return router
