"""A local fake of Alibaba Cloud Dysmsapi (2017-05-25) speaking the wire protocol of SDK 4.6.0.

It checks the ACS3-HMAC-SHA256 signature as Aliyun does (PROTOCOLS.md), implements SendSms,
SendBatchSms and QuerySendDetails, records every accepted message, and can be scripted to
misbehave call by call. In-process: `FakeDysmsapi` (serves from a background thread). Standalone:

    python -m tests.fakes.dysmsapi --port 0 --access-key-id ID --access-key-secret SECRET

prints ``{"url": ..., "port": ...}`` as its first stdout line and serves a JSON control API on
the same port: GET /_fake/messages, GET|POST /_fake/script, POST /_fake/reset, GET /_fake/stats.

Behaviours are dicts, queued in order. `action` picks the calls one applies to ("send" =
SendSms/SendBatchSms, the default; an action name; or "*"); `times: N` queues N copies.
  {"kind": "ok", "send_status": 2, "err_code": "IC:0001"}  accepted, with this delivery outcome
  {"kind": "business", "code": "isv.BUSINESS_LIMIT_CONTROL", "message": "触发天级流控Permits:10"}
  {"kind": "gateway", "status": 400, "code": "Throttling.User", "retry_after": 2000}  (ms header)
  {"kind": "non_json", "status": 502, "body": "<html>Bad Gateway</html>"}
  {"kind": "stall", "seconds": 60}  record it as sent, answer only after `seconds`
  {"kind": "hang", "seconds": 60}   record nothing, drop the connection after `seconds`
  {"kind": "refuse", "seconds": 1}  once at the head of the queue: stop listening for `seconds`
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import itertools
import json
import re
import signal
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from urllib.parse import parse_qsl, quote

from aiohttp import web

API_VERSION = "2017-05-25"
CHINA_TZ = timezone(timedelta(hours=8))
KINDS = {"ok", "business", "gateway", "non_json", "stall", "hang", "refuse"}
ACTIONS = {"SendSms", "SendBatchSms", "QuerySendDetails"}
AUTH = re.compile(r"ACS3-HMAC-SHA256 Credential=([^,]+),SignedHeaders=([^,]+),Signature=(\w+)")
# Mainland mobiles are 1[3-9] + 9 digits, also accepted behind +, +86, 0086 or 86; others are
# country code + number.
MAINLAND = re.compile(r"(?:\+|\+86|0086|86)?(1[3-9]\d{9})")
INTERNATIONAL = re.compile(r"(?:\+|00)?([1-9]\d{6,14})")
GATEWAY_STATUS = {"InvalidAccessKeyId.NotFound": 404, "InternalError": 500,
                  "ServiceUnavailable": 503}
MESSAGES = {
    "SignatureDoesNotMatch": "Specified signature is not matched with our calculation.",
    "InvalidAccessKeyId.NotFound": "Specified access key is not found.",
    "InvalidTimeStamp.Expired": "Specified time stamp or date value is expired.",
    "SignatureNonceUsed": "Specified signature nonce was used already.",
    "IncompleteSignature": "The request signature does not conform to Aliyun standards.",
    "Throttling.User": "Request was denied due to user flow control.",
    "ServiceUnavailable": "The request has failed due to a temporary failure of the server.",
}
_seq = itertools.count(1)


class Reply(Exception):
    """An error answer decided while checking a request; status 200 means a business error."""

    def __init__(self, code: str, message: str = "", status: int = 200) -> None:
        super().__init__(code)
        self.code, self.message, self.status = code, message or MESSAGES.get(code, code), status


def _json(body: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(text=json.dumps(body, ensure_ascii=False), status=status,
                        content_type="application/json", charset="utf-8", headers=headers)


def _beijing(ts: float) -> str:
    return datetime.fromtimestamp(ts, CHINA_TZ).strftime("%Y-%m-%d %H:%M:%S")


def _phone(raw: str) -> str:
    """Any number form Dysmsapi accepts -> the form QuerySendDetails files it under."""
    text = raw.strip()
    if match := MAINLAND.fullmatch(text):
        return match.group(1)
    match = INTERNATIONAL.fullmatch(text)
    if match and not match.group(1).startswith("86"):
        return match.group(1)
    raise Reply("isv.MOBILE_NUMBER_ILLEGAL", "非法手机号")


def _json_list(raw: str | None) -> list[Any] | None:
    try:
        value = json.loads(raw) if raw else None
    except ValueError:
        value = {}
    if value is not None and not isinstance(value, list):
        raise Reply("isv.INVALID_JSON_PARAM", "JSON参数不合法")
    return value


def _required(q: Mapping[str, str], *names: str) -> None:
    for name in names:
        if not q.get(name):
            raise Reply(f"Missing{name}", f"{name} is mandatory for this action.", 400)


def normalise_behaviours(raw: Any) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    for one in raw if isinstance(raw, list) else [raw]:
        item = dict(one)
        if item.get("kind") not in KINDS:
            raise ValueError(f"unknown behaviour kind {item.get('kind')!r}: use {sorted(KINDS)}")
        item.setdefault("action", "send")
        items += [dict(item) for _ in range(int(item.pop("times", 1)))]
    return items


class FakeDysmsapi:
    def __init__(self, access_key_id: str = "fake-ak-id", access_key_secret: str = "fake-secret",
                 *, credentials: Mapping[str, str] | None = None, port: int = 0,
                 param_max_chars: int = 35, templates: Mapping[str, str] | None = None) -> None:
        self.credentials = dict(credentials or {access_key_id: access_key_secret})
        self.port = port
        self.param_max_chars = param_max_chars  # longest template variable value; 0: no check
        # TemplateCode -> text with ${var}: when given, unknown codes and missing variables are
        # rejected and Content is rendered; otherwise any SMS_<digits> code is accepted.
        self.templates = dict(templates) if templates is not None else None
        self.requests: Counter[str] = Counter()
        # Numbers the carrier refuses (as Aliyun does a number that is not a mobile, or one on its
        # blacklist): any request naming one fails whole with isv.MOBILE_NUMBER_ILLEGAL.
        self.refused_numbers: set[str] = set()
        self._lock = threading.Lock()
        self._messages: list[dict[str, Any]] = []
        self._by_phone: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self._queue: list[dict[str, Any]] = []
        self._nonces: dict[str, float] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._server: asyncio.AbstractServer | None = None
        self._reopen: asyncio.TimerHandle | None = None

    # ---- for tests (thread-safe) ---------------------------------------------------------
    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"

    @property
    def messages(self) -> list[dict[str, Any]]:
        """Every accepted message (one per recipient), oldest first."""
        with self._lock:
            return [dict(m) for m in self._messages]

    @property
    def pending(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(b) for b in self._queue]

    def script(self, *behaviours: Mapping[str, Any]) -> None:
        items = normalise_behaviours(list(behaviours))
        with self._lock:
            self._queue += items
        if self._loop is not None:  # a refuse at the head must hold before the next call
            asyncio.run_coroutine_threadsafe(self._kick(), self._loop).result(5)

    def reset(self) -> None:
        with self._lock:
            for store in (self._messages, self._by_phone, self._queue, self._nonces,
                          self.requests, self.refused_numbers):
                store.clear()

    def start(self) -> FakeDysmsapi:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.open(), self._loop).result(10)
        return self

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        asyncio.run_coroutine_threadsafe(self.close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        self._loop = self._thread = None

    def __enter__(self) -> FakeDysmsapi:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- listening (on the server's loop) ------------------------------------------------
    async def open(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # handler_cancellation: a client that gave up cancels its stalled handler right away
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True,
                                     shutdown_timeout=0.2)
        await self._runner.setup()
        await self._listen()

    async def close(self) -> None:
        if self._reopen is not None:
            self._reopen.cancel()
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _listen(self) -> None:
        assert self._runner is not None and self._runner.server is not None
        self._server = await asyncio.get_running_loop().create_server(
            self._runner.server, "127.0.0.1", self.port, reuse_address=True)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _kick(self) -> None:
        """A `refuse` at the head of the queue: close the listening socket, reopen it later.
        Connections then really are refused (ECONNREFUSED), not accepted and dropped. Open
        keep-alive connections close too (each after its request in flight), as they would
        with a server that went away: a pooled client must meet the refusal, not slip past it
        on a connection it opened earlier."""
        with self._lock:
            if not self._queue or self._queue[0]["kind"] != "refuse" or self._server is None:
                return
            seconds = float(self._queue.pop(0).get("seconds", 1.0))
        self._server.close()
        self._server = None
        if self._runner is not None and self._runner.server is not None:
            for connection in list(self._runner.server.connections):
                # aiohttp has no public "idle?"; an idle one goes now, a busy one after its answer
                if connection._request_in_progress:
                    connection.close()
                else:
                    connection.force_close()
        self._reopen = asyncio.get_running_loop().call_later(
            seconds, lambda: asyncio.ensure_future(self._reopen_listener()))

    async def _reopen_listener(self) -> None:
        self._reopen = None
        if self._runner is not None and self._server is None:
            await self._listen()
            await self._kick()

    # ---- the API ---------------------------------------------------------------------------
    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.path.startswith("/_fake/"):
            return await self._control(request)
        request_id = str(uuid.uuid4()).upper()
        body = await request.read()
        try:
            query = dict(parse_qsl(request.raw_path.partition("?")[2], keep_blank_values=True))
            key_id = self._authenticate(request, query, body)
            action = request.headers.get("x-acs-action", "")
            if request.headers.get("x-acs-version") != API_VERSION:
                raise Reply("InvalidVersion", "Specified parameter Version is not valid.", 400)
            if action not in ACTIONS:
                raise Reply("InvalidAction.NotFound", "Specified api is not found.", 404)
            if request.content_type == "application/x-www-form-urlencoded":
                query.update(parse_qsl(body.decode(), keep_blank_values=True))
            self.requests[action] += 1
            behaviour = self._next(action)
        except Reply as reply:
            return self._error(reply, request_id)
        await self._kick()
        kind, seconds = behaviour["kind"], float(behaviour.get("seconds", 60))
        if kind == "hang":
            await asyncio.sleep(seconds)
            if request.transport is not None:
                request.transport.close()  # no answer at all; the response below goes nowhere
            return web.Response(status=504)
        if kind == "business":
            return self._error(Reply(behaviour["code"], behaviour.get("message", "")), request_id)
        if kind == "gateway":
            code = behaviour["code"]
            status = int(behaviour.get("status") or GATEWAY_STATUS.get(code, 400))
            wait = behaviour.get("retry_after")
            return self._error(Reply(code, behaviour.get("message", ""), status), request_id,
                               None if wait is None else {"x-acs-retry-after": str(wait)})
        if kind == "non_json":
            return web.Response(text=behaviour.get("body", "<html>502 Bad Gateway</html>"),
                                status=int(behaviour.get("status", 502)), content_type="text/html")
        try:
            call = {"key_id": key_id, "request_id": request_id, **behaviour}
            answer: dict[str, Any] = getattr(self, f"_{action}")(query, call)
            result = _json({"Code": "OK", "Message": "OK", "RequestId": request_id, **answer})
        except Reply as reply:
            result = self._error(reply, request_id)
        if kind == "stall":
            await asyncio.sleep(seconds)  # cancelled as soon as the client gives up
        return result

    def _error(self, reply: Reply, request_id: str,
               headers: Mapping[str, str] | None = None) -> web.Response:
        if reply.status == 200:
            return _json({"Code": reply.code, "Message": reply.message, "RequestId": request_id})
        return _json({"RequestId": request_id, "HostId": "dysmsapi.aliyuncs.com",
                      "Code": reply.code, "Message": reply.message,
                      "Recommend": f"https://api.aliyun.com/troubleshoot?q={reply.code}"},
                     reply.status, headers)

    def _next(self, action: str) -> dict[str, Any]:
        with self._lock:
            for i, item in enumerate(self._queue):
                wanted = item["action"]
                if item["kind"] != "refuse" and (wanted in ("*", action) or (
                        wanted == "send" and action in ("SendSms", "SendBatchSms"))):
                    return self._queue.pop(i)
        return {"kind": "ok"}

    def _authenticate(self, request: web.Request, query: Mapping[str, str], body: bytes) -> str:
        match = AUTH.fullmatch(request.headers.get("Authorization", ""))
        if not match:
            raise Reply("IncompleteSignature", status=400)
        key_id, signed, signature = match.groups()
        secret = self.credentials.get(key_id)
        if secret is None:
            raise Reply("InvalidAccessKeyId.NotFound", status=404)
        names = signed.split(";")
        must_sign = {"host"} | {h.lower() for h in request.headers if h.lower().startswith("x-acs-")}
        if not must_sign <= set(names) or "x-acs-date" not in must_sign:
            raise Reply("IncompleteSignature", status=400)
        # canonical = METHOD \n PATH \n query \n "name:value\n"... \n names \n sha256hex(body)
        values = {name: sorted(v.strip() for v in request.headers.getall(name, [])) for name in names}
        headers = "".join(f"{name}:{','.join(values[name])}\n" for name in sorted(names))
        canonical = "\n".join([
            request.method, request.raw_path.partition("?")[0] or "/",
            "&".join(f"{k}={quote(query[k], safe='~')}" for k in sorted(query)),
            headers, ";".join(names), hashlib.sha256(body).hexdigest()])
        to_sign = "ACS3-HMAC-SHA256\n" + hashlib.sha256(canonical.encode()).hexdigest()
        expected = hmac.new(secret.encode(), to_sign.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, signature):
            raise Reply("SignatureDoesNotMatch", f"{MESSAGES['SignatureDoesNotMatch']} "
                        f"server string to sign is:{to_sign}", 400)
        try:
            sent = datetime.strptime(request.headers["x-acs-date"], "%Y-%m-%dT%H:%M:%SZ")
        except ValueError:
            raise Reply("InvalidTimeStamp.Format", "Specified time stamp is invalid.", 400) from None
        now = time.time()
        if abs(sent.replace(tzinfo=UTC).timestamp() - now) > 900:
            raise Reply("InvalidTimeStamp.Expired", status=400)
        nonce = request.headers.get("x-acs-signature-nonce", "")
        with self._lock:  # Aliyun refuses a nonce seen in the last 15 minutes
            if nonce in self._nonces:
                raise Reply("SignatureNonceUsed", status=400)
            self._nonces[nonce] = now
            if len(self._nonces) > 100_000:
                self._nonces = {n: t for n, t in self._nonces.items() if now - t < 900}
        return key_id

    # Each action gets the parameters and `how`: the caller's key id, request id and behaviour.
    def _SendSms(self, q: Mapping[str, str], how: Mapping[str, Any]) -> dict[str, Any]:
        _required(q, "PhoneNumbers", "SignName", "TemplateCode")
        phones = q["PhoneNumbers"].split(",")
        if len(phones) > 1000:
            raise Reply("isv.MOBILE_COUNT_OVER_LIMIT", "手机号码数量超过限制")
        params = self._params(q["TemplateCode"], q.get("TemplateParam"))
        items = [(p, q["SignName"], params, q.get("SmsUpExtendCode")) for p in phones]
        return {"BizId": self._accept("SendSms", items, q, how)}

    def _SendBatchSms(self, q: Mapping[str, str], how: Mapping[str, Any]) -> dict[str, Any]:
        _required(q, "PhoneNumberJson", "SignNameJson", "TemplateCode")
        phones, signs = _json_list(q["PhoneNumberJson"]) or [], _json_list(q["SignNameJson"]) or []
        params = _json_list(q.get("TemplateParamJson")) or [None] * len(phones)
        codes = _json_list(q.get("SmsUpExtendCodeJson")) or [None] * len(phones)
        if len(phones) > 100:
            raise Reply("isv.MOBILE_COUNT_OVER_LIMIT", "手机号码数量超过限制")
        if not len(phones) == len(signs) == len(params) == len(codes):
            raise Reply("isv.INVALID_PARAMETERS", "JSON数组长度不一致")
        items = [(p, s, self._params(q["TemplateCode"], json.dumps(t) if t else None), c)
                 for p, s, t, c in zip(phones, signs, params, codes, strict=True)]
        return {"BizId": self._accept("SendBatchSms", items, q, how)}

    def _QuerySendDetails(self, q: Mapping[str, str], how: Mapping[str, Any]) -> dict[str, Any]:
        _required(q, "PhoneNumber", "SendDate", "PageSize", "CurrentPage")
        size, page = q["PageSize"], q["CurrentPage"]
        if not (re.fullmatch(r"\d{8}", q["SendDate"]) and size.isdigit() and page.isdigit()
                and 1 <= int(size) <= 50 and int(page) >= 1):
            raise Reply("isv.INVALID_PARAMETERS", "参数异常")
        phone, day, biz_id = _phone(q["PhoneNumber"]), q["SendDate"], q.get("BizId")
        with self._lock:
            found = [m for m in reversed(self._by_phone.get(phone, []))  # newest first
                     if m["send_date"][:10].replace("-", "") == day
                     and biz_id in (None, "", m["biz_id"])]
        start = (int(page) - 1) * int(size)
        dtos = [{"SendStatus": m["send_status"], "ErrCode": m["err_code"], "OutId": m["out_id"],
                 "PhoneNum": m["phone"], "SendDate": m["send_date"],
                 "ReceiveDate": m["receive_date"], "Content": m["content"],
                 "TemplateCode": m["template_code"]} for m in found[start:start + int(size)]]
        return {"TotalCount": len(found), "SmsSendDetailDTOs": {"SmsSendDetailDTO": dtos}}

    def _params(self, template_code: str, raw: str | None) -> dict[str, str]:
        known = (template_code in self.templates if self.templates is not None
                 else re.fullmatch(r"SMS_\d+", template_code))
        if not known:
            raise Reply("isv.SMS_TEMPLATE_ILLEGAL", "模板不合法(不存在或被拉黑)")
        try:
            params = json.loads(raw) if raw else {}
        except ValueError:
            params = None
        if not isinstance(params, dict) or not all(isinstance(v, str) for v in params.values()):
            raise Reply("isv.INVALID_JSON_PARAM", "JSON参数不合法，只接受字符串值")
        if self.param_max_chars and any(len(v) > self.param_max_chars for v in params.values()):
            raise Reply("isv.PARAM_LENGTH_LIMIT", "参数超出长度限制")
        text = (self.templates or {}).get(template_code, "")
        if any(var not in params for var in re.findall(r"\$\{(\w+)\}", text)):
            raise Reply("isv.TEMPLATE_MISSING_PARAMETERS", "模板缺少变量")
        return params

    def _accept(self, action: str, items: list[tuple[str, str, dict[str, str], str | None]],
                q: Mapping[str, str], how: Mapping[str, Any]) -> str:
        """Check every recipient first (one bad number fails the whole request), then record."""
        for phone, _sign, _params, extend in items:
            if _phone(phone) in self.refused_numbers:
                raise Reply("isv.MOBILE_NUMBER_ILLEGAL", "非法手机号")
            if extend and not re.fullmatch(r"\d{1,12}", extend):
                raise Reply("isv.EXTEND_CODE_ERROR", "扩展码使用错误")
        now = time.time()
        biz_id = f"{int(now * 1000) % 10**12:012d}{next(_seq) % 10**6:06d}^0"
        status = int(how.get("send_status", 3))  # 1 waiting for receipt, 2 failed, 3 delivered
        err_code = how.get("err_code") or ("DELIVERED" if status == 3 else "")
        with self._lock:
            for phone, sign, params, extend in items:
                text = (self.templates or {}).get(q["TemplateCode"]) or \
                    f"{q['TemplateCode']} {json.dumps(params, ensure_ascii=False)}"
                for key, value in params.items():
                    text = text.replace("${" + key + "}", value)
                record = {
                    "action": action, "phone_numbers": phone, "phone": _phone(phone),
                    "sign_name": sign, "template_code": q["TemplateCode"],
                    "template_param": params, "template_param_raw": q.get("TemplateParam"),
                    "out_id": q.get("OutId"), "sms_up_extend_code": extend, "biz_id": biz_id,
                    "access_key_id": how["key_id"], "request_id": how["request_id"],
                    "timestamp": now, "send_date": _beijing(now),
                    "send_status": status, "err_code": err_code,
                    "receive_date": _beijing(now) if status != 1 else "",
                    "content": f"【{sign}】{text}",
                }
                self._messages.append(record)
                self._by_phone[record["phone"]].append(record)
        return biz_id

    # ---- control API (no signature: loopback only) ---------------------------------------
    async def _control(self, request: web.Request) -> web.Response:
        what = (request.method, request.path.removeprefix("/_fake/"))
        if what == ("GET", "messages"):
            return _json(self.messages)
        if what == ("GET", "script"):
            return _json(self.pending)
        if what == ("GET", "stats"):
            with self._lock:
                return _json({"requests": dict(self.requests), "messages": len(self._messages),
                              "pending": len(self._queue)})
        if what == ("POST", "reset"):
            self.reset()
            return _json({"ok": True})
        if what == ("POST", "script"):
            try:
                items = normalise_behaviours(await request.json())
            except (ValueError, TypeError) as exc:
                return _json({"error": str(exc)}, 400)
            with self._lock:
                self._queue += items
            await self._kick()
            return _json({"queued": len(items)})
        return _json({"error": f"no control endpoint {request.method} {request.path}"}, 404)


async def _serve(fake: FakeDysmsapi) -> None:
    await fake.open()
    print(json.dumps({"url": fake.url, "port": fake.port}), flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await fake.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fake Alibaba Cloud Dysmsapi on 127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed)")
    parser.add_argument("--access-key-id", action="append", required=True)
    parser.add_argument("--access-key-secret", action="append", required=True)
    parser.add_argument("--param-max-chars", type=int, default=35, help="0 disables the check")
    args = parser.parse_args(argv)
    if len(args.access_key_id) != len(args.access_key_secret):
        parser.error("give one --access-key-secret per --access-key-id")
    credentials = dict(zip(args.access_key_id, args.access_key_secret, strict=True))
    fake = FakeDysmsapi(credentials=credentials, port=args.port,
                        param_max_chars=args.param_max_chars)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(fake))


if __name__ == "__main__":
    main()
