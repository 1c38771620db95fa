"""Nasty input on every endpoint: a clear 4xx naming the problem, never a 500, nothing stored.

A table of the bodies that broke something (each row says what the sender saw before) and a few
representative ones per endpoint. One app for the module, on the session's redis-server; each
test starts from a flushed database.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from notifier.api.app import create_app
from notifier.config import settings_from_mapping
from notifier.drills.replies import reply_inbox
from notifier.receipts import receipt_inbox
from tests.support.served import ServedClient, served_client
from tests.support.servers import RedisServer

TOKEN = "fuzz-api-token"
CONFIG: dict[str, Any] = {
    "channels": {"sms": {"provider": "sandbox"}, "email": {"provider": "sandbox"}},
    "recipients": {"alice": {"phone": "+8613800138000", "email": "alice@example.com"},
                   "bob": {"phone": "+8613900139000"}},
    "groups": {"ops": ["alice", "bob"]},
    "routes": [{"match": {}, "to": ["ops"], "channels": ["email"]}],
    "max_body_bytes": 64 * 1024,
}
SPEC = {"name": "DR", "operators": ["ops"], "phases": ["p1", "p2"]}
JSON = {"Content-Type": "application/json"}
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
REPLY = json.loads((FIXTURES / "aliyun-sms-up.json").read_text())[0]
REPORT = json.loads((FIXTURES / "aliyun-sms-report.json").read_text())[0]


@pytest.fixture(scope="module")
def api(redis_server: RedisServer) -> Iterator[ServedClient]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NOTIFIER_API_TOKEN", TOKEN)
        mp.delenv("NOTIFIER_CALLBACK_TOKEN", raising=False)
        app = create_app(settings_from_mapping({**CONFIG, "redis_url": redis_server.url}))
        # Served as `notifier api` serves it: the ingest routes' own HTTP path is fuzzed too.
        with served_client(app, headers={"Authorization": f"Bearer {TOKEN}"}) as client:
            yield client


@pytest.fixture
def drill(api: ServedClient, redis_client: redis.Redis) -> str:
    """A drill with its first phase live (the database is flushed before each test)."""
    created = api.post("/v1/drills", json={**SPEC, "start": True})
    assert created.status_code == 201, created.text
    return str(created.json()["id"])


# The JSON routes FastAPI serves (everything but the two ingest routes and the callbacks).
FASTAPI_ROUTES = ["/v1/drills", "/v1/breakers/sms:sandbox", "/v1/drills/{drill}/confirm"]
NOT_JSON = [
    # Was 422 ["2: JSON decode error"]: a position, no word of what is wrong.
    pytest.param(b"{not json", "not valid JSON", id="garbage"),
    pytest.param(b'{"name": "DR"', "not valid JSON", id="truncated"),
    pytest.param(b"{}garbage", "not valid JSON", id="trailing-data"),
    pytest.param(b"\xff\xfe{}", "not valid JSON", id="not-utf8"),
    pytest.param(b"   ", "empty", id="only-whitespace"),
    # Was 400 "There was an error parsing the body": Python's json refuses it by raising a
    # plain ValueError (4300-digit limit) or RecursionError, which FastAPI does not explain.
    pytest.param(b"9" * 5000, "not valid JSON", id="5000-digit-integer"),
    pytest.param(b"[" * 20_000 + b"]" * 20_000, "not valid JSON", id="nested-20000-deep"),
]


@pytest.mark.parametrize("raw, names", NOT_JSON)
@pytest.mark.parametrize("route", FASTAPI_ROUTES)
def test_a_body_that_is_not_json_is_a_400_saying_so(api: ServedClient, drill: str, route: str,
                                                    raw: bytes, names: str) -> None:
    before = api.get(f"/v1/drills/{drill}").json()
    response = api.post(route.format(drill=drill), content=raw, headers=JSON)
    assert response.status_code == 400, response.text
    assert names in response.text
    assert [d["id"] for d in api.get("/v1/drills").json()] == [drill]  # no drill created
    assert api.get(f"/v1/drills/{drill}").json() == before  # nobody confirmed


def test_json_of_the_wrong_shape_still_names_the_field(api: ServedClient, drill: str) -> None:
    for route in FASTAPI_ROUTES:
        response = api.post(route.format(drill=drill), content=b"[1, 2]", headers=JSON)
        assert response.status_code == 422 and "body: Input should be" in response.text, route
    missing = api.post("/v1/drills", json={"name": "x"})
    assert missing.status_code == 422 and "operators: Field required" in missing.text
    breaker = api.post("/v1/breakers/sms:sandbox", json={"action": "explode", "by": "me"})
    assert breaker.status_code == 422 and "action:" in breaker.text


# A lone UTF-16 surrogate escape: Python's json reads it into a str that cannot be encoded as
# UTF-8, so it fails wherever it is written to Redis or into a response.
LONE = '"\\ud800"'
SURROGATES = [
    # Was a 500 (UnicodeEncodeError writing the drill to Redis): `phases` is a union of str and
    # object, which pydantic passes through unchecked.
    pytest.param("/v1/drills", f'{{"name": "DR", "operators": ["ops"], "phases": [{LONE}]}}',
                 id="drill-phase-name"),
    pytest.param("/v1/drills", f'{{"name": "DR", "operators": ["ops"], "phases": ["a"], '
                               f'"escalation": [{LONE}]}}', id="drill-escalation"),
    pytest.param("/v1/drills", f'{{"name": {LONE}, "operators": ["ops"], "phases": ["a"]}}',
                 id="drill-name"),
    pytest.param("/v1/drills/{drill}/confirm", f'{{"operator": "alice", "by": {LONE}}}',
                 id="confirm-by"),
    pytest.param("/v1/breakers/sms:sandbox", f'{{"action": "open", "by": "me", "reason": {LONE}}}',
                 id="breaker-reason"),
]


@pytest.mark.parametrize("route, body", SURROGATES)
def test_a_lone_surrogate_is_refused_as_invalid_json_and_nothing_is_stored(
        api: ServedClient, drill: str, route: str, body: str) -> None:
    before = api.get(f"/v1/drills/{drill}").json()
    response = api.post(route.format(drill=drill), content=body.encode(), headers=JSON)
    assert response.status_code == 400, response.text
    assert "not valid JSON" in response.text
    assert [d["id"] for d in api.get("/v1/drills").json()] == [drill]
    assert api.get(f"/v1/drills/{drill}").json() == before
    assert api.get("/v1/breakers").json()[0]["state"] == "closed"


def test_a_body_with_a_utf8_bom_is_still_read(api: ServedClient, redis_client: redis.Redis) -> None:
    response = api.post("/v1/drills", content=b"\xef\xbb\xbf" + json.dumps(SPEC).encode(),
                        headers=JSON)
    assert response.status_code == 201, response.text


# Aliyun pushes: each record is checked on its own, so one bad record must cost neither the push
# (a 5xx is re-pushed three times, then dropped by Aliyun with every good record in it) nor the
# good records beside it.
PUSHES = [
    # Was a 500 (UnicodeEncodeError storing the reply): `dest_code` and `sequence_id` are
    # `str | int` unions, which pydantic passes a lone surrogate through unchecked.
    pytest.param("sms-up", REPLY, "dest_code", "\ud800", id="reply-dest_code-surrogate"),
    pytest.param("sms-up", REPLY, "sequence_id", "\udfff", id="reply-sequence_id-surrogate"),
    pytest.param("sms-up", REPLY, "content", "\ud800", id="reply-content-surrogate"),
    pytest.param("sms-up", REPLY, "phone_number", None, id="reply-phone-null"),
    pytest.param("sms-report", REPORT, "err_msg", "\ud800", id="report-err_msg-surrogate"),
    pytest.param("sms-report", REPORT, "success", "maybe", id="report-success-not-bool"),
]


@pytest.mark.parametrize("push, good, field, value", PUSHES)
def test_a_bad_record_is_dropped_and_the_good_one_beside_it_stored(
        api: ServedClient, redis_client: redis.Redis, push: str, good: dict[str, Any], field: str,
        value: Any) -> None:
    url = f"/v1/callbacks/aliyun/{push}"
    inbox = (reply_inbox if push == "sms-up" else receipt_inbox)(redis_client, 3600)
    bad = {**good, field: value, "phone_number": "8613900139000", "biz_id": "other^0"}
    if field == "phone_number":
        bad[field] = value
    alone = api.post(url, content=json.dumps([bad]).encode(), headers=JSON)
    assert alone.status_code == 422, alone.text
    assert f"[0].{field}" in alone.text
    assert inbox.pending() == 0
    mixed = api.post(url, content=json.dumps([good, bad]).encode(), headers=JSON)
    assert mixed.status_code == 200, mixed.text
    assert mixed.json() == {"code": 0, "msg": "接收成功"}
    assert inbox.pending() == 1


# Was 422 ["body: Input should be a valid dictionary or object to extract fields from"] for a
# valid JSON body: FastAPI reads a body as JSON only when the Content-Type says so, and
# `curl -d` sends application/x-www-form-urlencoded.
@pytest.mark.parametrize("content_type", [None, "application/x-www-form-urlencoded", "text/plain"])
@pytest.mark.parametrize("route", FASTAPI_ROUTES)
def test_a_json_body_sent_as_another_content_type_is_a_415_naming_it(
        api: ServedClient, drill: str, route: str, content_type: str | None) -> None:
    body = {"/v1/drills": SPEC, "/v1/breakers/sms:sandbox": {"action": "open", "by": "me"},
            "/v1/drills/{drill}/confirm": {"operator": "alice"}}[route]
    headers = {} if content_type is None else {"Content-Type": content_type}
    before = api.get(f"/v1/drills/{drill}").json()
    response = api.post(route.format(drill=drill), content=json.dumps(body).encode(),
                        headers=headers)
    assert response.status_code == 415, response.text
    assert "Content-Type: application/json" in response.text
    assert api.get(f"/v1/drills/{drill}").json() == before
    assert [d["id"] for d in api.get("/v1/drills").json()] == [drill]
    assert api.get("/v1/breakers").json()[0]["state"] == "closed"
    wrong_token = api.post(route.format(drill=drill), content=b"{}", headers={
        **headers, "Authorization": "Bearer nope"})
    assert wrong_token.status_code == 401  # credentials are checked first
