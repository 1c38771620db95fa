"""The HTTP API against a real redis-server: acceptance, dedup, idempotency, auth, bad input."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml
from fastapi.testclient import TestClient

from notifier.api.app import create_app
from notifier.config import settings_from_mapping
from notifier.errors import ConfigError
from notifier.ledger import Ledger
from notifier.ledger_accept import EVENTS_PER_TASK
from notifier.metrics import metric_field, metric_key
from notifier.models import TxStatus
from notifier.schemas import AlertmanagerWebhook
from notifier.sources import from_alertmanager
from notifier.tasks_spec import DISPATCH_QUEUE
from tests.support.inline import decode_task
from tests.support.served import ServedClient, served_client
from tests.support.servers import RedisServer

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
TOKEN = "s3cret-token-value"

CONFIG: dict[str, Any] = {
    "channels": {"sms": {"provider": "sandbox"}, "email": {"provider": "sandbox"}},
    "recipients": {"alice": {"phone": "+8613800138000", "email": "alice@example.com"}},
    "groups": {"oncall": ["alice"]},
    "routes": [{"match": {}, "to": ["oncall"], "channels": ["email"]}],
    "max_body_bytes": 64 * 1024,
}


def fixture(name: str) -> dict[str, Any]:
    return dict(json.loads((FIXTURES / name).read_text()))


@pytest.fixture
def client(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[ServedClient]:
    """The API as `notifier api` serves it (the ingest routes' own HTTP path included)."""
    monkeypatch.setenv("NOTIFIER_API_TOKEN", TOKEN)
    app = create_app(settings_from_mapping({**CONFIG, "redis_url": redis_url}))
    with served_client(app, headers={"Authorization": f"Bearer {TOKEN}"}) as served:
        yield served


def test_alertmanager_fixture_is_stored_and_its_dispatch_published(client: ServedClient,
                                                                    redis_client: Any) -> None:
    response = client.post("/v1/alertmanager", json=fixture("alertmanager-firing.json"))
    assert response.status_code == 200
    txid = response.json()["transaction_id"]
    assert "suppressed" not in response.json()
    view = client.get(f"/v1/transactions/{txid}").json()
    assert view["status"] == "accepted" and view["source"] == "alertmanager"
    assert view["event"]["kind"] == "alert" and view["receiver"] == "notifier"
    assert view["event"]["alerts"][0]["fingerprint"] == "cdb42a40decd3214"
    # Kept as the body Alertmanager sent; every reader sees the Event built from it.
    posted = from_alertmanager(AlertmanagerWebhook.model_validate(fixture("alertmanager-firing.json")))
    assert view["event"] == posted.to_json()
    stored = json.loads(redis_client.hget(f"ntf:tx:{txid}", "webhook"))
    assert stored == fixture("alertmanager-firing.json")
    queued = [json.loads(m) for m in redis_client.lrange(DISPATCH_QUEUE, 0, -1)]
    assert [m["headers"]["argsrepr"] for m in queued] == [repr([txid])]


def test_identical_resend_is_suppressed_and_points_at_the_original(client: ServedClient) -> None:
    body = fixture("alertmanager-critical-truncated.json")
    first = client.post("/v1/alertmanager", json=body).json()
    again = client.post("/v1/alertmanager", json=body)
    assert again.status_code == 200
    assert again.json() == {"transaction_id": first["transaction_id"], "suppressed": True}
    view = client.get(f"/v1/transactions/{first['transaction_id']}").json()
    assert view["suppressed_duplicates"] == 1
    assert any(h["event"] == "duplicate_suppressed" for h in view["history"])
    resolved = client.post("/v1/alertmanager", json=fixture("alertmanager-resolved.json")).json()
    assert resolved["transaction_id"] != first["transaction_id"] and "suppressed" not in resolved


def test_a_webhook_only_pydantic_accepts_is_accepted_and_dedups_with_its_strict_twin(
        client: ServedClient, redis_client: Any) -> None:
    # truncatedAlerts as "1": the first-pass decoder refuses it (notifier.api.first_pass), the
    # model accepts it. It must be stored as any webhook, and be the same group for dedup.
    strict = fixture("alertmanager-critical-truncated.json")
    lax = client.post("/v1/alertmanager", json={**strict, "truncatedAlerts": str(strict["truncatedAlerts"])})
    assert lax.status_code == 200, lax.text
    txid = lax.json()["transaction_id"]
    assert client.get(f"/v1/transactions/{txid}").json()["event"]["truncated_alerts"] == 1
    assert redis_client.llen(DISPATCH_QUEUE) == 1
    again = client.post("/v1/alertmanager", json=strict).json()
    assert again == {"transaction_id": txid, "suppressed": True}


def test_a_webhook_with_fields_beyond_the_model_is_accepted_and_readable(client: ServedClient) -> None:
    # Undeclared fields skip the first pass (notifier.api.first_pass): pydantic accepts them.
    body = fixture("alertmanager-firing.json")
    body["futureField"] = {"nested": [1, None]}
    body["alerts"][0]["silencedBy"] = ["abc"]
    accepted = client.post("/v1/alertmanager", json=body)
    assert accepted.status_code == 200, accepted.text
    view = client.get(f"/v1/transactions/{accepted.json()['transaction_id']}")
    assert view.status_code == 200 and view.json()["event"]["alerts"][0]["fingerprint"] == "cdb42a40decd3214"


def test_a_damaged_transaction_is_shown_not_a_500_and_is_not_replayed(client: ServedClient,
                                                                       redis_client: Any) -> None:
    # Damage, or a stored body a later schema no longer reads: dispatch fails it as a dead letter
    # (tests/integration/test_inline_dispatch.py); the operator must still see it.
    txid = client.post("/v1/alertmanager", json=fixture("alertmanager-firing.json")).json()["transaction_id"]
    redis_client.hset(f"ntf:tx:{txid}", mapping={"webhook": b'{"receiver": "\xff', "status": "failed"})
    redis_client.zadd("ntf:deadletters", {txid: time.time()})
    view = client.get(f"/v1/transactions/{txid}")
    assert view.status_code == 200, view.text
    assert view.json()["event"] is None and view.json()["status"] == "failed"
    assert "cannot be read" in view.json()["event_error"] and view.json()["source"] == "alertmanager"
    replay = client.post(f"/v1/deadletters/{txid}/replay")
    assert replay.status_code == 409 and "cannot be read" in replay.text
    listed = client.get("/v1/deadletters").json()
    assert [d["transaction_id"] for d in listed] == [txid]  # still there for the operator


def test_a_dead_letter_is_dropped_by_an_operator_or_once_its_transaction_expired(
        client: ServedClient, redis_client: Any) -> None:
    ledger = Ledger(redis_client, retention=3600)
    stale, expired, kept = (client.post("/v1/events", json={"title": t, "to": ["oncall"]})
                            .json()["transaction_id"] for t in ("stale", "expired", "kept"))
    now = time.time()
    redis_client.zadd("ntf:deadletters", {stale: now - 60, expired: now - 3700, kept: now - 30})
    assert ledger.trim_dead_letters() == 1  # failed longer than retention ago: nothing to replay
    assert client.delete(f"/v1/deadletters/{stale}").status_code == 204
    assert client.delete(f"/v1/deadletters/{stale}").status_code == 404
    assert [d["transaction_id"] for d in client.get("/v1/deadletters").json()] == [kept]
    assert any(e["event"] == "dead_letter_dropped" for e in ledger.history(stale))
    assert TestClient(client.app).delete(f"/v1/deadletters/{kept}").status_code == 401


def test_a_refused_replay_keeps_the_dead_letter_until_one_is_accepted(
        redis_url: str, redis_client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFIER_API_TOKEN", TOKEN)

    def api(config: dict[str, Any]) -> TestClient:
        app = create_app(settings_from_mapping({**config, "redis_url": redis_url}))
        return TestClient(app, headers={"Authorization": f"Bearer {TOKEN}"})

    with api(CONFIG) as before:
        accepted = before.post("/v1/events", json={"title": "DiskFull", "to": ["oncall"]})
    txid = accepted.json()["transaction_id"]
    ledger = Ledger(redis_client)
    ledger.finish(txid, TxStatus.FAILED)  # as dispatch does: failed -> dead letter
    [(_, failed_at)] = ledger.dead_letters()
    # The group is renamed (oncall -> sre): the event names a group the config no longer has.
    renamed = {**CONFIG, "groups": {"sre": ["alice"]},
               "routes": [{"match": {}, "to": ["sre"], "channels": ["email"]}]}
    with api(renamed) as after:
        replay = after.post(f"/v1/deadletters/{txid}/replay")
        assert replay.status_code == 422 and "oncall" in replay.text, replay.text
        listed = after.get("/v1/deadletters").json()
    assert listed == [{"transaction_id": txid, "failed_at": failed_at}]  # as it was
    assert redis_client.llen(DISPATCH_QUEUE) == 1  # the original's only
    with api(CONFIG) as fixed:  # the config is put right: the replay goes through, once
        replay = fixed.post(f"/v1/deadletters/{txid}/replay")
        assert replay.status_code == 202, replay.text
        assert fixed.get("/v1/deadletters").json() == []
        assert fixed.post(f"/v1/deadletters/{txid}/replay").status_code == 404
    assert redis_client.llen(DISPATCH_QUEUE) == 2


def test_changed_alert_set_is_a_new_notification(client: ServedClient) -> None:
    body = fixture("alertmanager-critical-truncated.json")
    first = client.post("/v1/alertmanager", json=body).json()
    body["alerts"] = body["alerts"][:1]
    second = client.post("/v1/alertmanager", json=body).json()
    assert second["transaction_id"] != first["transaction_id"] and "suppressed" not in second


def test_an_alert_that_fires_again_after_resolving_is_a_new_notification(client: ServedClient) -> None:
    # Flapping within the dedup window: firing, resolved, then firing again (a new startsAt,
    # the same fingerprint). The third must page: its person's last message said RESOLVED.
    firing = fixture("alertmanager-firing.json")
    first = client.post("/v1/alertmanager", json=firing).json()
    resolved = client.post("/v1/alertmanager", json=fixture("alertmanager-resolved.json")).json()
    assert "suppressed" not in resolved
    firing["alerts"][0]["startsAt"] = "2026-11-23T03:52:41.730555223Z"
    again = client.post("/v1/alertmanager", json=firing).json()
    assert again["transaction_id"] != first["transaction_id"] and "suppressed" not in again
    # while a retry of that very webhook is still one notification
    assert client.post("/v1/alertmanager", json=firing).json() == {**again, "suppressed": True}


def test_a_large_group_sent_as_the_readme_configures_alertmanager_is_accepted(
        redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # A group of 4,000 alerts (a per-pod alert across a cluster) as the README's receiver sends
    # it: without max_alerts, the whole group in one body, past max_body_bytes: a 413, which
    # Alertmanager never retries, so that group paged nobody.
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    snippet = next(b for b in re.findall(r"```yaml\n(.*?)```", readme, re.S) if "webhook_configs" in b)
    [hook] = yaml.safe_load(snippet)["receivers"][0]["webhook_configs"]
    body = fixture("alertmanager-firing.json")
    alerts = [{**body["alerts"][0], "fingerprint": f"{i:016x}"} for i in range(4000)]
    sent = alerts[:hook.get("max_alerts") or len(alerts)]
    body.update(alerts=sent, truncatedAlerts=len(alerts) - len(sent))
    monkeypatch.delenv("NOTIFIER_API_TOKEN", raising=False)
    config = {key: value for key, value in CONFIG.items() if key != "max_body_bytes"}  # the default
    with TestClient(create_app(settings_from_mapping({**config, "redis_url": redis_url}))) as client:
        response = client.post("/v1/alertmanager", json=body)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("kind", ["drill", "digest"])
def test_an_event_of_an_internal_kind_is_refused_naming_kind(client: ServedClient, redis_client: Any,
                                                             kind: str) -> None:
    # A drill event needs the reply code only a drill gives it (it could never be rendered); a
    # digest one would pass for a merged digest. Drills submit theirs themselves (test_drill_flow).
    response = client.post("/v1/events", json={"kind": kind, "title": "DR drill: switch to hz-b"})
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0].startswith(f"kind: {kind!r} is reserved")
    assert redis_client.llen(DISPATCH_QUEUE) == 0


def test_events_idempotency_key(client: ServedClient) -> None:
    event = {"title": "DiskFull on db-1", "severity": "critical", "body": "磁盘 97%"}
    first = client.post("/v1/events", json=event, headers={"Idempotency-Key": "k-1"})
    assert first.status_code == 202
    same = client.post("/v1/events", json=event, headers={"Idempotency-Key": "k-1"})
    assert same.status_code == 202 and same.json() == first.json()
    other = client.post("/v1/events", json={**event, "title": "else"},
                        headers={"Idempotency-Key": "k-1"})
    assert other.status_code == 422 and "Idempotency-Key" in other.text
    fresh = client.post("/v1/events", json=event)
    assert fresh.json()["transaction_id"] != first.json()["transaction_id"]


FIRING_TAIL = json.dumps(fixture("alertmanager-firing.json")).encode()[1:]  # after its "{"
BAD_INPUTS = [
    ("/v1/alertmanager", b"{not json", 400, "not valid JSON"),
    ("/v1/alertmanager", b"", 400, "empty"),
    ("/v1/alertmanager", json.dumps({**fixture("alertmanager-firing.json"), "version": "3"}).encode(),
     422, "version"),
    ("/v1/alertmanager", json.dumps({"version": "4", "receiver": "x", "status": "firing",
                                     "groupKey": "k", "alerts": []}).encode(), 422, "alerts"),
    ("/v1/alertmanager", json.dumps({**fixture("alertmanager-firing.json"), "status": "boom"}).encode(),
     422, "status"),
    pytest.param("/v1/alertmanager", b'{"x":' + b"[" * 5000 + b"]" * 5000 + b"}", 400,
                 "recursion limit", id="alertmanager-nested-5000-deep"),
    # Undeclared fields pydantic refuses, which a decoder skipping them would have stored:
    pytest.param("/v1/alertmanager", b'{"x":"\xff",' + FIRING_TAIL, 400, "not valid JSON",
                 id="alertmanager-extra-field-invalid-utf8"),
    pytest.param("/v1/alertmanager", b'{"x":' + b"[" * 300 + b"]" * 300 + b"," + FIRING_TAIL, 400,
                 "recursion limit", id="alertmanager-extra-field-300-deep"),
    ("/v1/alertmanager", json.dumps({**fixture("alertmanager-firing.json"),
                                     "truncatedAlerts": 2**64}).encode(), 422, "truncatedAlerts"),
    ("/v1/events", json.dumps({"severity": "critical"}).encode(), 422, "title"),
    ("/v1/events", json.dumps({"title": "t", "kind": "../../etc"}).encode(), 422, "kind"),
    ("/v1/events", json.dumps({"title": "t", "to": ["nobody"]}).encode(), 422, "nobody"),
    ("/v1/events", json.dumps({"title": "t", "channels": ["fax"]}).encode(), 422, "channels"),
    ("/v1/events", json.dumps({"title": "t", "channels": ["push"]}).encode(), 422, "push"),
    ("/v1/events", json.dumps({"title": "t", "colour": "red"}).encode(), 422, "colour"),
    ("/v1/events", json.dumps([1, 2]).encode(), 422, "body"),
    ("/v1/events", json.dumps({"title": "x" * 70_000}).encode(), 413, "larger than"),
    ("/v1/alertmanager", json.dumps({"receiver": "x" * 70_000}).encode(), 413, "larger than"),
    ("/v1/drills", json.dumps({"name": "x" * 70_000}).encode(), 413, "larger than"),  # FastAPI's
]


@pytest.mark.parametrize(("path", "raw", "status", "names"), BAD_INPUTS)
def test_bad_input_gets_a_4xx_naming_the_problem(client: ServedClient, path: str, raw: bytes,
                                                 status: int, names: str) -> None:
    response = client.post(path, content=raw, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    assert names in response.text


def test_oversized_body_without_content_length_is_413(client: ServedClient) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(100):
            yield b" " * 1024

    for path in ("/v1/events", "/v1/alertmanager", "/v1/drills"):
        response = client.post(path, content=chunks())
        assert response.status_code == 413 and "larger than" in response.text, path


def test_auth_required_on_v1_bearer_or_basic(client: ServedClient) -> None:
    body = fixture("alertmanager-firing.json")
    assert client.post("/v1/alertmanager", json=body, headers={"Authorization": ""}).status_code == 401
    wrong = client.post("/v1/alertmanager", json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and TOKEN not in wrong.text
    basic = base64.b64encode(f"alertmanager:{TOKEN}".encode()).decode()
    ok = client.post("/v1/alertmanager", json=body, headers={"Authorization": f"Basic {basic}"})
    assert ok.status_code == 200
    txid = ok.json()["transaction_id"]
    assert client.get(f"/v1/transactions/{txid}", headers={"Authorization": ""}).status_code == 401
    assert client.get("/healthz", headers={"Authorization": ""}).status_code == 200


def test_unknown_transaction_is_404(client: ServedClient) -> None:
    response = client.get("/v1/transactions/tx-nope")
    assert response.status_code == 404 and "tx-nope" in response.text


def test_metrics_count_events_by_source_and_outcome(client: ServedClient) -> None:
    body = fixture("alertmanager-firing.json")
    client.post("/v1/alertmanager", json=body)
    client.post("/v1/alertmanager", json=body)
    text = client.get("/metrics").text
    assert 'notifier_events_received_total{outcome="new",source="alertmanager"} 1.0' in text
    assert 'notifier_events_received_total{outcome="duplicate",source="alertmanager"} 1.0' in text
    assert "notifier_redis_up 1.0" in text
    assert 'notifier_queue_backlog{queue="notifier.dispatch"} 1.0' in text


def test_redis_down_answers_503_and_nothing_is_half_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFIER_API_TOKEN", raising=False)
    server = RedisServer()
    server.start()
    try:
        app = create_app(settings_from_mapping({**CONFIG, "redis_url": server.url}))
        with TestClient(app) as client:
            body = fixture("alertmanager-firing.json")
            server.stop()
            down = client.post("/v1/alertmanager", json=body)
            assert down.status_code == 503 and down.headers["Retry-After"] == "1"
            assert client.get("/readyz").status_code == 503
            assert "notifier_redis_up 0.0" in client.get("/metrics").text
            server.start()
            assert client.get("/readyz").status_code == 200
            up = client.post("/v1/alertmanager", json=body)
            assert up.status_code == 200 and "suppressed" not in up.json()
    finally:
        server.close()


def test_operators_force_breakers_and_it_is_recorded(client: ServedClient) -> None:
    listed = {b["name"]: b for b in client.get("/v1/breakers").json()}
    assert set(listed) == {"sms:sandbox", "email:sandbox"}
    assert listed["sms:sandbox"]["state"] == "closed"
    opened = client.post("/v1/breakers/sms:sandbox",
                         json={"action": "open", "by": "alice", "reason": "provider outage"})
    assert opened.status_code == 200
    assert opened.json()["state"] == "forced_open" and opened.json()["changed_by"] == "alice"
    metrics = client.get("/metrics").text
    assert 'notifier_breaker_state{breaker="sms:sandbox",state="forced_open"} 1.0' in metrics
    reset = client.post("/v1/breakers/sms:sandbox", json={"action": "reset", "by": "bob"})
    assert reset.json()["state"] == "closed"
    assert client.post("/v1/breakers/fax:x", json={"action": "open", "by": "a"}).status_code == 404
    bad = client.post("/v1/breakers/sms:sandbox", json={"action": "explode", "by": "a"})
    assert bad.status_code == 422 and "action" in bad.text
    unauthenticated = client.post("/v1/breakers/sms:sandbox", json={"action": "open", "by": "x"},
                                  headers={"Authorization": ""})
    assert unauthenticated.status_code == 401


def test_notify_raises_a_clear_error_when_redis_is_down() -> None:
    from notifier.client import intake_for
    from notifier.errors import BrokerUnavailable
    from notifier.models import Event, Source

    server = RedisServer()
    server.start()
    intake = intake_for(settings_from_mapping({**CONFIG, "redis_url": server.url}))
    server.close()
    with pytest.raises(BrokerUnavailable, match="redis unavailable"):
        intake.submit(Event(kind="alert", title="x"), Source.CLIENT)


@pytest.mark.parametrize("value", ["", "  \n"])
@pytest.mark.parametrize("name", ["NOTIFIER_API_TOKEN", "NOTIFIER_CALLBACK_TOKEN"])
def test_a_blank_token_refuses_to_start_naming_its_variable(
        redis_url: str, monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    # What a missing secret looks like (NAME= in the env file, NAME=${UNSET}): it must not open
    # the API. Unset stays open (loopback demos, notifier up).
    monkeypatch.setenv("NOTIFIER_API_TOKEN", TOKEN)
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=f"^{name}: set but empty"):
        create_app(settings_from_mapping({**CONFIG, "redis_url": redis_url}))


def test_a_token_from_a_file_with_its_newline_still_matches(redis_url: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFIER_API_TOKEN", f"{TOKEN}\n")
    app = create_app(settings_from_mapping({**CONFIG, "redis_url": redis_url}))
    with TestClient(app) as anonymous:
        body = fixture("alertmanager-firing.json")
        assert anonymous.post("/v1/alertmanager", json=body).status_code == 401
        accepted = anonymous.post("/v1/alertmanager", json=body,
                                  headers={"Authorization": f"Bearer {TOKEN}"})
        assert accepted.status_code == 200, accepted.text


def test_every_v1_endpoint_in_the_openapi_spec_requires_credentials(
        redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFIER_API_TOKEN", TOKEN)
    monkeypatch.setenv("NOTIFIER_CALLBACK_TOKEN", "callback-token")  # Aliyun's pushes: ?token=
    client = TestClient(create_app(settings_from_mapping({**CONFIG, "redis_url": redis_url})))
    spec = client.get("/openapi.json").json()
    checked = 0
    for path, operations in spec["paths"].items():
        if not path.startswith("/v1/"):
            continue
        for method in operations:
            url = path.replace("{", "").replace("}", "")  # any value will do
            response = client.request(method.upper(), url, json={}, headers={"Authorization": ""})
            assert response.status_code == 401, (method, path, response.status_code)
            checked += 1
    assert checked >= 15  # ingest, tracking, operators, callbacks and drills are all there


def test_accept_survives_redis_forgetting_its_scripts(client: ServedClient,
                                                      redis_client: redis.Redis) -> None:
    first = client.post("/v1/events", json={"title": "before"})
    redis_client.script_flush()  # what a Redis restart without persistence does to scripts
    second = client.post("/v1/events", json={"title": "after"})
    assert first.status_code == second.status_code == 202
    assert redis_client.llen(DISPATCH_QUEUE) == 2


def test_concurrent_webhooks_in_one_batch_each_get_their_own_transaction(
        redis_url: str, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests of the same moment share script calls (at most MAX_EVENTS events each) and
    dispatch messages (at most EVENTS_PER_TASK each), but each gets its own answer; a resend
    inside the same batch is still recognised as a duplicate of the first."""
    monkeypatch.setenv("NOTIFIER_API_TOKEN", TOKEN)
    app = create_app(settings_from_mapping({**CONFIG, "redis_url": redis_url}))
    bodies = []
    for i in range(40):
        body = fixture("alertmanager-firing.json")
        body["groupKey"] = f"group-{i}"
        body["commonLabels"] = {**body["commonLabels"], "n": str(i)}
        bodies.append(body)
    bodies.append(bodies[3])  # Alertmanager's retry, racing the original

    async def post_all() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api",
                                     headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            return await asyncio.gather(*(http.post("/v1/alertmanager", json=b) for b in bodies))

    responses = asyncio.run(post_all())
    assert [r.status_code for r in responses] == [200] * 41
    txids = [r.json()["transaction_id"] for r in responses[:40]]
    assert len(set(txids)) == 40
    assert responses[40].json() == {"transaction_id": txids[3], "suppressed": True}
    ledger = Ledger(redis_client)
    for txid, body in zip(txids, bodies[:40], strict=True):  # each answer names its own event
        stored = ledger.transaction(txid)
        assert stored is not None and stored.event.labels["n"] == body["commonLabels"]["n"]
    messages = [decode_task(m)[1] for m in redis_client.lrange(DISPATCH_QUEUE, 0, -1)]
    assert 40 / EVENTS_PER_TASK <= len(messages) < 40
    assert all(len(named) <= EVENTS_PER_TASK for named in messages)
    named = [txid for message in messages for txid in message]
    assert set(txids) <= set(named) and len(named) == len(set(named))  # each queued once
    counted = {k.decode(): float(v) for k, v in redis_client.hgetall(
        metric_key("notifier_events_received")).items()}  # a script call counts all its events
    assert sorted(counted.values()) == [1.0, 40.0]
    assert {k for k, v in counted.items() if v == 40.0} == {metric_field(
        "notifier_events_received", source="alertmanager", outcome="new")}


def test_a_hung_redis_gets_503_and_the_api_stays_responsive(monkeypatch: pytest.MonkeyPatch) -> None:
    """Redis stops answering (SIGSTOP: a stuck host, a long fork): the accept waits for the
    socket timeout and answers 503, while /healthz keeps answering in the meantime — waiting on
    Redis never blocks the event loop."""
    monkeypatch.delenv("NOTIFIER_API_TOKEN", raising=False)
    server = RedisServer(appendonly=False)
    server.start()
    assert server.process is not None
    pid = server.process.pid
    try:
        app = create_app(settings_from_mapping({**CONFIG, "redis_url": server.url}))
        with TestClient(app) as client, ThreadPoolExecutor(max_workers=1) as pool:
            assert client.post("/v1/events", json={"title": "before"}).status_code == 202
            os.kill(pid, signal.SIGSTOP)
            try:
                pending = pool.submit(client.post, "/v1/events", json={"title": "while hung"})
                for _ in range(10):  # about a second of health checks: the accept is in flight
                    assert client.get("/healthz").status_code == 200
                    time.sleep(0.1)
                # ...and still waiting on Redis (socket timeout 3 s): health was not queued behind it
                assert not pending.done()
                hung = pending.result(timeout=30)
            finally:
                os.kill(pid, signal.SIGCONT)
            assert hung.status_code == 503 and hung.headers["Retry-After"] == "1"
            assert "redis unavailable" in hung.json()["detail"]
            assert client.post("/v1/events", json={"title": "after"}).status_code == 202
    finally:
        server.close()


@pytest.mark.parametrize("path", ["/v1/events", "/v1/alertmanager"])
def test_a_client_gone_before_its_body_ended_has_nothing_accepted(
        path: str, redis_url: str, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client sent a first chunk that happens to be a valid request, then disconnected
    before the rest: that part is not the request, nothing is stored, nothing answered."""
    monkeypatch.setenv("NOTIFIER_API_TOKEN", TOKEN)
    app = create_app(settings_from_mapping({**CONFIG, "redis_url": redis_url}))
    first = (json.dumps({"kind": "alert", "title": "partial", "to": ["alice"]}) if path == "/v1/events"
             else json.dumps(fixture("alertmanager-firing.json"))).encode()
    messages = [{"type": "http.request", "body": first, "more_body": True},
                {"type": "http.disconnect"}]
    sent: list[dict[str, Any]] = []
    scope = {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(),
             "query_string": b"", "headers": [(b"authorization", f"Bearer {TOKEN}".encode()),
                                              (b"transfer-encoding", b"chunked")]}

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    before = len(redis_client.keys("ntf:tx:*"))
    asyncio.run(app(scope, receive, send))  # type: ignore[arg-type]
    assert sent == []
    assert len(redis_client.keys("ntf:tx:*")) == before
    assert redis_client.llen(DISPATCH_QUEUE) == 0
