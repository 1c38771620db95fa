"""A whole drill as processes: redis-server, `notifier api`, `notifier worker`, `notifier
scheduler`, the sandbox SMS provider pushing Aliyun SmsReport receipts back to the API.

Two operators; alice confirms by an SmsUp reply (through `notifier sandbox reply`), bob does
not, so the deadline escalates (SMS again + email to bob, email to carol) and then records the
miss; the report shows both. Forged replies confirm nothing; duplicate SmsUp and SmsReport
pushes count once; two schedulers run, and every timer still acts once.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from notifier.channels.sandbox import outbox_key
from tests.support.servers import wait_until
from tests.support.stack import Stack

API_TOKEN, CALLBACK_TOKEN = "drill-api-token-1a2b", "drill-callback-token-3c4d"
ALICE, BOB, STRANGER = "8613800138000", "13900139000", "+8613700137000"
UP = "/v1/callbacks/aliyun/sms-up"
REPORT = "/v1/callbacks/aliyun/sms-report"
CONFIG: dict[str, Any] = {
    "locale": "en",
    "scheduler_interval": "100ms",
    "channels": {"sms": {"provider": "sandbox"}, "email": {"provider": "sandbox"}},
    "recipients": {
        "alice": {"phone": "+8613800138000", "email": "alice@example.com"},
        "bob": {"phone": "+8613900139000", "email": "bob@example.com"},
        "carol": {"email": "carol@example.com"},
    },
    "routes": [{"match": {}, "to": ["carol"], "channels": ["sms"], "fallback": ["email"]}],
}
DEADLINE = 8.0  # long enough for the forged replies to be checked before alice answers


@pytest.fixture
def stack(tmp_path: Path, redis_url: str) -> Iterator[Stack]:
    config = copy.deepcopy(CONFIG)
    running = Stack(tmp_path, redis_url, config,
                    env={"NOTIFIER_API_TOKEN": API_TOKEN, "NOTIFIER_CALLBACK_TOKEN": CALLBACK_TOKEN})
    # The sandbox pushes receipts to the stack's own API, as Aliyun would (token added from env).
    running.config["channels"]["sms"]["report_url"] = f"{running.base}{REPORT}"
    running.start()
    running._spawn("scheduler2", "scheduler")  # two schedulers: timers must still fire once
    yield running
    running.stop()


def create(stack: Stack, **spec: Any) -> str:
    response = stack.post("/v1/drills", {"start": True, **spec})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def report(stack: Stack, drill_id: str) -> dict[str, Any]:
    response = stack.get(f"/v1/drills/{drill_id}/report")
    assert response.status_code == 200, response.text
    return dict(response.json())


def codes(stack: Stack, client: redis.Redis, drill_id: str, phase: int = 0) -> dict[str, str]:
    """Each operator's reply code, read off the SMS the sandbox 'sent' (what a phone shows)."""
    found: dict[str, str] = {}

    def announced() -> bool:
        ops = report(stack, drill_id)["phases"][phase]["operators"]
        sent = {json.loads(m)["transaction_id"]: json.loads(m)
                for m in client.lrange(outbox_key("sms"), 0, -1)}
        for op in ops:
            entry = sent.get(op["announce_transaction"] or "")
            if entry is not None:
                found[op["operator"]] = re.findall(r"\d{6}", entry["params"]["code"])[0]
        return len(found) == len(ops)

    wait_until(announced, timeout=15, interval=0.1)
    return found


def push_up(stack: Stack, phone: str, text: str, seq: str) -> None:
    body = [{"phone_number": phone, "send_time": "2026-11-23 11:52:31", "content": text,
             "dest_code": "1234", "sequence_id": seq}]
    response = httpx.post(f"{stack.base}{UP}", params={"token": CALLBACK_TOKEN}, json=body)
    assert response.status_code == 200 and response.json() == {"code": 0, "msg": "接收成功"}


def events(stack: Stack, drill_id: str, name: str) -> list[dict[str, Any]]:
    return [e for e in report(stack, drill_id)["timeline"] if e["event"] == name]


def test_drill_confirm_escalate_miss_and_report(stack: Stack, redis_client: redis.Redis) -> None:
    # Two drills whose codes alice will later misuse: B's codes expire after 1 s; C is over.
    other = {"operators": ["alice", "bob"], "phases": [{"name": "warm-up", "deadline": "60s"}],
             "escalation_rounds": 0}
    drill_b = create(stack, name="B", reply_code_ttl="1s", **other)
    drill_c = create(stack, name="C", **other)
    code_b, code_c = codes(stack, redis_client, drill_b), codes(stack, redis_client, drill_c)
    for finished in (drill_b, drill_c):
        assert stack.post(f"/v1/drills/{finished}/finish").status_code == 200
    issued_b = max(e["at"] for e in events(stack, drill_b, "announce"))
    time.sleep(max(0.0, issued_b + 1.2 - time.time()))  # B's codes have expired now

    drill = create(stack, name="DR 2026-11", operators=["alice", "bob"],
                   phases=[{"name": "primary stopped", "deadline": f"{DEADLINE}s"},
                           {"name": "traffic switched"}],
                   escalation=["carol"], escalation_rounds=1)
    code = codes(stack, redis_client, drill)
    assert code["alice"] != code["bob"] and code["alice"] not in (*code_b.values(),
                                                                  *code_c.values())

    # Forged replies: another number, a wrong code, bob's code, an expired code, a code of a
    # drill that is over. None confirms anything; each is recorded with its reason.
    forged = [(STRANGER, f"{code['alice']} 确认"), (ALICE, "000001"), (ALICE, code["bob"]),
              (ALICE, code_b["alice"]), (ALICE, code_c["alice"])]
    for seq, (phone, text) in enumerate(forged, start=1):
        push_up(stack, phone, text, f"f{seq}")
    wait_until(lambda: len(events(stack, drill, "reply_rejected")) == 3, timeout=15)
    reasons = sorted(e["detail"].split("reason=")[1].split(",")[0]
                     for e in events(stack, drill, "reply_rejected"))
    assert reasons == ["unknown_code", "wrong_number", "wrong_number"]
    wait_until(lambda: events(stack, drill_b, "reply_rejected")
               and events(stack, drill_c, "reply_rejected"), timeout=10)
    assert "reason=expired_code" in events(stack, drill_b, "reply_rejected")[0]["detail"]
    assert "reason=phase_not_live" in events(stack, drill_c, "reply_rejected")[0]["detail"]
    for drill_id in (drill, drill_b, drill_c):
        assert report(stack, drill_id)["summary"]["confirmations"] == 0

    # alice replies from her phone, full-width digits and 确认 around the code; Aliyun pushes
    # the very same reply again, and so does `notifier sandbox reply` (Aliyun's format).
    full_width = "".join(chr(ord(c) + 0xFEE0) for c in code["alice"])
    push_up(stack, ALICE, f"确认 {full_width} OK", "4242")
    wait_until(lambda: events(stack, drill, "confirmed"), timeout=10)
    push_up(stack, ALICE, f"确认 {full_width} OK", "4242")
    cli = [sys.executable, "-m", "notifier", "sandbox", "reply", "--from", ALICE,
           "--text", f"确认 {full_width} OK", "--sequence-id", "4242"]
    done = subprocess.run(cli, env=stack.env, capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert "HTTP 200" in done.stdout and CALLBACK_TOKEN not in done.stdout + done.stderr

    # bob never answers: the deadline escalates once, then the miss is recorded.
    wait_until(lambda: events(stack, drill, "missed"), timeout=3 * DEADLINE + 10, interval=0.2)

    # The sandbox's SmsReport for alice's SMS closed it; Aliyun pushes it twice more.
    phase = report(stack, drill)["phases"][0]
    alice = next(op for op in phase["operators"] if op["operator"] == "alice")
    view = stack.transaction(alice["announce_transaction"])
    (sms,) = [d for d in view["deliveries"] if d["channel"] == "sms"]
    wait_until(lambda: stack.transaction(alice["announce_transaction"])["deliveries"][0]["status"]
               == "delivered", timeout=10)
    receipt = [{"phone_number": ALICE, "send_time": "2026-11-23 11:50:02",
                "report_time": "2026-11-23 11:50:05", "success": True, "err_code": "DELIVERED",
                "err_msg": "用户接收成功", "sms_size": "1", "biz_id": sms["provider_message_id"],
                "out_id": sms["delivery_id"]}]
    for _ in range(2):
        response = httpx.post(f"{stack.base}{REPORT}", params={"token": CALLBACK_TOKEN},
                              json=receipt)
        assert response.status_code == 200
    time.sleep(1.5)
    (sms,) = [d for d in stack.transaction(alice["announce_transaction"])["deliveries"]
              if d["channel"] == "sms"]
    assert [a["outcome"] for a in sms["attempts"]].count("receipt") == 1

    assert stack.post(f"/v1/drills/{drill}/finish").status_code == 200
    final = report(stack, drill)
    phase = final["phases"][0]
    by_name = {op["operator"]: op for op in phase["operators"]}
    alice, bob = by_name["alice"], by_name["bob"]
    assert alice["result"] == "confirmed" and alice["confirmed_via"] == "sms"
    for measure in ("accepted", "delivered", "confirmed"):
        assert alice[measure]["status"] == "ok", (measure, alice[measure])
        assert 0 <= alice[measure]["seconds"] <= alice[measure]["target"]
    assert alice["escalations"] == []
    assert bob["result"] == "missed" and bob["confirmed"]["status"] == "missing"
    assert bob["confirmed"]["flagged"] and bob["accepted"]["status"] == "ok"
    assert [e["round"] for e in bob["escalations"]] == [1]
    assert bob["escalations"][0]["channels"] == ["sms", "email"]
    assert [e["to"] for e in phase["escalation_recipients"]] == [["carol"]]
    assert phase["rejected_replies"] == 3
    assert final["summary"]["confirmations"] == 1
    assert final["summary"]["misses"] == ["primary stopped / bob"]
    assert final["summary"]["result"] == "fail"
    # Duplicate SmsUp pushes counted once: one confirmation, no repeats recorded.
    (confirmed,) = events(stack, drill, "confirmed")
    assert confirmed["operator"] == "alice" and "by=+86138****8000" in confirmed["detail"]
    assert events(stack, drill, "reply_repeated") == []
    timeline = [e["event"] for e in final["timeline"]]
    for expected in ("phase_started", "announce", "reply_rejected", "confirmed",
                     "escalation_round", "escalation", "escalation_recipients", "missed",
                     "finished"):
        assert expected in timeline, expected

    # What went out: bob's SMS twice (announce + escalation), bob and carol by email.
    sms_to = [json.loads(m)["to"] for m in redis_client.lrange(outbox_key("sms"), 0, -1)]
    mail_to = [json.loads(m)["to"] for m in redis_client.lrange(outbox_key("email"), 0, -1)]
    assert sms_to.count("+8613900139000") == 2 + 2  # B and C announced to bob too
    assert mail_to.count("bob@example.com") == mail_to.count("carol@example.com") == 1

    markdown = stack.get(f"/v1/drills/{drill}/report", params={"format": "markdown"})
    assert markdown.status_code == 200
    assert markdown.headers["content-type"].startswith("text/markdown")
    text = markdown.text
    assert "# Drill report: DR 2026-11" in text and "**FAIL**" in text
    assert re.search(r"\| bob \|.*\*\*MISSED\*\*", text)
    assert re.search(r"\| alice \|.*\(via sms\) \| 0 \| confirmed \|", text)
    assert code["alice"] not in text and code["bob"] not in text  # codes stay off reports

    # The replies are counted fleet-wide: one confirmation, the repeats, every forgery rejected.
    replies = {line.split('result="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
               for line in stack.get("/metrics").text.splitlines()
               if line.startswith("notifier_replies_total{")}
    assert replies.get("confirmed") == 1.0
    assert sum(v for k, v in replies.items() if k not in ("confirmed", "already_confirmed")) \
        >= len(forged)
