"""SMS through Alibaba Cloud Dysmsapi (API 2017-05-25) with the official SDK.

A channel sends and raises a classified error; every classification lives in aliyun_errors.

Calls use the SDK's synchronous methods, not its `*_async` ones: the async path builds a new
aiohttp session, TCP connection and (HTTPS) SSL context loading certifi's CA file on every
call, while the sync path keeps one pooled keep-alive `requests` session per endpoint in
`DaraCore._sessions`. They run on the calling thread, blocking the loop: provider coroutines run
one at a time on a loop of their own (notifier.aio), so nothing else waits on it, and a thread
hop per call cost 0.3-0.6 ms of CPU per SMS (measured: bench, inline pipeline). That dict is class-level and
process-wide, so a forked child drops what it inherited (`_forget_sessions`) and opens its own
connections: a socket shared with the parent would interleave two processes' requests.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from datetime import date, datetime, timedelta, timezone
from typing import Any

from alibabacloud_dysmsapi20170525 import models as sms_models
from alibabacloud_dysmsapi20170525.client import Client
from alibabacloud_tea_openapi.utils_models import Config
from billiard.exceptions import SoftTimeLimitExceeded
from darabonba.core import DaraCore
from darabonba.runtime import RuntimeOptions

from notifier.channels.aliyun_errors import causes, classify_exception, classify_response
from notifier.channels.base import Channel, ChannelContext, ChannelLimits
from notifier.config import AliyunSmsProvider, normalise_phone
from notifier.errors import ConfigError, DeliveryError, PermanentError
from notifier.models import Outgoing, Receipt

log = logging.getLogger(__name__)
# China has had no DST since 1991, so a fixed offset is Asia/Shanghai without needing tzdata.
CHINA_TZ = timezone(timedelta(hours=8), "Asia/Shanghai")
PAGE_SIZE = 50  # QuerySendDetails allows 1-50
MAX_PAGES = 40  # 2000 records of one number on one day is far past Aliyun's per-number caps
# Fields of a QuerySendDetails record a receipt reconciler needs (Content stays out: it is the
# rendered message, which may carry reply codes, and is not needed to reconcile).
STATUS_FIELDS = ("SendStatus", "ErrCode", "OutId", "ReceiveDate", "SendDate", "PhoneNum",
                 "TemplateCode")


def aliyun_phone(address: str) -> str:
    """E.164 -> what Dysmsapi expects: mainland numbers as the bare 11 digits, others as country
    code + number without '+' or '00' (the SDK's SendSms/QuerySendDetails docs: 852000012****).

    Caveat of that documented form: a +1 number whose area code starts with 3-9 reads like a
    mainland 1[3-9]xxxxxxxxx number; North American recipients belong on SendMessageToGlobe.
    """
    try:
        e164 = normalise_phone(address)
    except ValueError as exc:
        raise PermanentError("InvalidPhoneNumber", str(exc)) from None
    return e164[3:] if e164.startswith("+86") else e164[1:]


def aliyun_phones(address: str) -> str:
    """One number, or a batch delivery's comma-separated numbers (max_batch), converted."""
    return ",".join(aliyun_phone(part) for part in address.split(",") if part.strip())


def beijing_time(value: str) -> float | None:
    """An Aliyun timestamp ("yyyy-MM-dd HH:mm:ss", Beijing time) as epoch seconds; None if it
    is not one."""
    try:
        return datetime.strptime(value, "%Y-%m-%d %H:%M:%S").replace(tzinfo=CHINA_TZ).timestamp()
    except ValueError:
        return None


def send_dates(sent_after: float, now: float | None = None) -> list[str]:
    """SendDate values (yyyyMMdd, Beijing time) on which a send made after `sent_after` may be
    filed: that day, and the next one when midnight has passed since."""
    first = datetime.fromtimestamp(sent_after, CHINA_TZ).date()
    today = datetime.fromtimestamp(time.time() if now is None else now, CHINA_TZ).date()
    days = [first]
    if today > first:
        days.append(first + timedelta(days=1))
    return [day.strftime("%Y%m%d") for day in days]


class AliyunSms(Channel):
    """One Aliyun account (AccessKey pair) sending template SMS."""

    channel = "sms"
    # 500: longest template content Aliyun accepts (signature + variables included); the
    # variables themselves are cut to `param_max_chars` by the renderer.
    limits = ChannelLimits(address="phone", body_maxlen=500, max_batch=1000, max_mixed_batch=100)
    can_look_up = True  # QuerySendDetails

    def __init__(self, config: AliyunSmsProvider, context: ChannelContext) -> None:
        super().__init__(config.name)
        self.config = config
        key_id = _required_env(context.env, config.access_key_id_env, config.name)
        secret = _required_env(context.env, config.access_key_secret_env, config.name)
        self._key_id_hint = f"{key_id[:4]}****" if len(key_id) > 8 else "****"
        # The secret lives only inside the SDK's credential object, never on this instance.
        self._client = Client(
            Config(
                access_key_id=key_id,
                access_key_secret=secret,
                endpoint=config.endpoint,
                protocol=config.protocol,
                region_id=config.region_id,
            )
        )
        self._runtime = RuntimeOptions(
            connect_timeout=max(1, round(config.connect_timeout * 1000)),
            read_timeout=max(1, round(config.read_timeout * 1000)),
        )

    def __repr__(self) -> str:
        return (
            f"AliyunSms(name={self.provider_name!r}, endpoint={self.config.endpoint!r}, "
            f"access_key_id={self._key_id_hint!r})"
        )

    def template_for(self, kind: str) -> str:
        code = self.config.templates.get(self.config.template_kind(kind))
        if not code:
            raise PermanentError(
                "NoTemplate",
                f"sms provider {self.provider_name!r} has no template for kind {kind!r} "
                "and no 'alert' template to fall back on",
            )
        return code

    async def send(self, message: Outgoing) -> Receipt:
        params = _template_params(message)
        request = sms_models.SendSmsRequest(
            phone_numbers=aliyun_phones(message.address),
            sign_name=self.config.sign_name,
            template_code=self.template_for(message.kind),
            template_param=json.dumps(params, ensure_ascii=False) if params else None,
            out_id=message.delivery_id,
            sms_up_extend_code=message.data.get("sms_up_extend_code") or None,
        )
        body = await _checked(self._client.send_sms_with_options, request, self._runtime)
        return _receipt(body)

    def mixed_key(self, message: Outgoing) -> Hashable | None:
        """SendBatchSms carries one template for all: messages of the same template share a
        request. With or without an extension code, not both: a number without one would need
        an empty entry in SmsUpExtendCodeJson, which nothing documents."""
        try:
            template = self.template_for(message.kind)
        except PermanentError:
            return None  # its own send fails it, with the reason
        return template, bool(message.data.get("sms_up_extend_code"))

    async def send_each(self, messages: Sequence[Outgoing], batch_id: str) -> Receipt:
        """SendBatchSms: index-aligned JSON arrays of numbers, signatures, template variables
        (and extension codes), one OutId and one BizId for the request."""
        codes = [m.data.get("sms_up_extend_code") or "" for m in messages]
        request = sms_models.SendBatchSmsRequest(
            phone_number_json=json.dumps([aliyun_phone(m.address) for m in messages]),
            sign_name_json=json.dumps([self.config.sign_name] * len(messages), ensure_ascii=False),
            template_code=self.template_for(messages[0].kind),
            template_param_json=json.dumps([_template_params(m) for m in messages],
                                           ensure_ascii=False),
            sms_up_extend_code_json=json.dumps(codes) if any(codes) else None,
            out_id=batch_id,
        )
        body = await _checked(self._client.send_batch_sms_with_options, request, self._runtime)
        return _receipt(body)

    async def lookup(self, message: Outgoing, sent_after: float) -> Receipt | None:
        """Did this delivery reach Aliyun after all? QuerySendDetails by number and day, matched
        on OutId (= delivery_id, or the id of a batch it went out in: `aliases`). Any SendStatus
        counts: Aliyun accepted it, so resending would duplicate it. The records carry no BizId,
        so `provider_message_id` is empty; the delivery receipt (SmsReport) brings it later,
        keyed on the same OutId.

        If QuerySendDetails itself fails (down, or a RAM policy allowing SendSms only) we cannot
        tell, and say None: a possible duplicate beats an alert that never goes out. Records can
        also lag the send by a few seconds, so a very early None is not proof."""
        try:
            phone = aliyun_phones(message.address).split(",")[0]  # one request: any will do
            out_ids = {message.delivery_id, *message.aliases}
            for day in send_dates(sent_after):
                for record in await self._records(phone, day, biz_id=None):
                    if record.get("OutId") in out_ids:
                        detail = {key: str(record.get(key) or "") for key in STATUS_FIELDS}
                        detail["found_by"] = "QuerySendDetails"
                        # Sent when Aliyun took it (SendDate), not now: the look-up runs a
                        # backoff or a claim lease later.
                        return Receipt(provider_message_id="", detail=detail,
                                       sent_at=beijing_time(detail["SendDate"]))
        except DeliveryError as exc:
            log.warning("lookup of %s via QuerySendDetails failed: %s", message.delivery_id,
                        exc.code, extra={"transaction_id": message.transaction_id,
                                         "delivery_id": message.delivery_id,
                                         "provider": self.provider_name, "error_code": exc.code})
        return None

    async def query_status(
        self, phone: str, send_date: str | date, biz_id: str | None = None
    ) -> list[dict[str, Any]]:
        """Delivery status of what was sent to `phone` (E.164) on `send_date` (yyyyMMdd or a
        date, Beijing time), optionally only the send `biz_id`: one dict per record with
        SendStatus (1 waiting, 2 failed, 3 delivered), ErrCode, OutId, ReceiveDate, SendDate,
        PhoneNum and TemplateCode."""
        day = send_date.strftime("%Y%m%d") if isinstance(send_date, date) else send_date
        records = await self._records(aliyun_phone(phone), day, biz_id=biz_id)
        return [{key: record.get(key) for key in STATUS_FIELDS} for record in records]

    async def _records(self, phone: str, day: str, biz_id: str | None) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = []
        for page in range(1, MAX_PAGES + 1):
            request = sms_models.QuerySendDetailsRequest(
                phone_number=phone, send_date=day, page_size=PAGE_SIZE, current_page=page,
                biz_id=biz_id or None,
            )
            body = await _checked(self._client.query_send_details_with_options, request,
                                  self._runtime)
            dtos = body.sms_send_detail_dtos
            batch = [dto.to_map() for dto in (dtos.sms_send_detail_dto or [])] if dtos else []
            records.extend(batch)
            total = _int(body.total_count)
            if len(batch) < PAGE_SIZE or (total is not None and len(records) >= total):
                break
        return records


def _required_env(env: Mapping[str, str], name: str, provider: str) -> str:
    value = env.get(name, "").strip()
    if not value:
        raise ConfigError(
            f"channels.sms provider {provider!r}: environment variable {name} is not set "
            "(the Aliyun AccessKey pair is read from the environment, never from the file)"
        )
    return value


def _template_params(message: Outgoing) -> dict[str, str]:
    return {str(k): str(v) for k, v in message.rendered.params.items()}


def _receipt(body: Any) -> Receipt:
    return Receipt(provider_message_id=str(body.biz_id or ""),
                   request_id=str(body.request_id or ""))


def _int(value: object) -> int | None:
    try:
        return int(str(value))
    except ValueError:
        return None


async def _checked(call: Callable[..., Any], *args: Any) -> Any:
    """One Dysmsapi call (a sync SDK method, run right here: see the module docstring), both
    error layers: SDK exceptions (gateway 4xx/5xx, transport) and a business `Code` other than
    OK in an HTTP 200 body become classified errors. The SDK enforces the connect and read
    timeouts of the runtime options itself (requests' `timeout=(connect, read)`).

    Celery's soft time limit, raised by a signal inside the blocking call, is not Aliyun's
    answer and goes up as it is, as it does from the other channels (notifier.aio): the step
    is out of time. Classified, a look-up would read it as "not found" and send again."""
    try:
        response = call(*args)
    except Exception as exc:
        time_up = next((e for e in causes(exc) if isinstance(e, SoftTimeLimitExceeded)), None)
        if time_up is not None:  # (the SDK wraps it in UnretryableException)
            raise time_up from None
        raise classify_exception(exc) from exc
    body = response.body
    code = str(body.code or "") if body is not None else ""
    if code != "OK":
        raise classify_response(code, str(getattr(body, "message", "") or ""))
    return body


def _forget_sessions() -> None:
    """In a forked child: drop the parent's pooled sessions (their sockets are the parent's)
    without closing them, which would only close this process's copy of each descriptor."""
    DaraCore._sessions.clear()


os.register_at_fork(after_in_child=_forget_sessions)
