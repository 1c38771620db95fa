"""The one place that classifies Alibaba Cloud Dysmsapi failures (see PROTOCOLS.md, Dysmsapi).

Failures come in two layers and both end up here:

* business errors: HTTP 200 with ``Code != "OK"``; the SDK raises nothing, the channel calls
  `classify_response(code, message)`;
* gateway and transport errors: the SDK (alibabacloud-tea-openapi 0.4.6 / darabonba-core 1.0.x)
  raises, and the channel calls `classify_exception(exc)`.

Unknown codes: an unknown ``isv.*`` code is the provider rejecting *this request* (``isv`` =
independent software vendor, i.e. the caller's side), so it is permanent; an unknown ``isp.*``
code (``isp`` = the service provider's side) or any 5xx is the provider being unwell, so it is
transient. A gateway 403, whatever its code (Forbidden.RAM, NoPermission, a disabled key), is the
AccessKey not being allowed to call the API: an ACCOUNT failure, so the channel's next account
takes the alert and the breaker counts it. Other unknown gateway 4xx codes are permanent: a
malformed request does not fix itself by being resent.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Iterator

import aiohttp
import requests
import urllib3.exceptions
from alibabacloud_tea_openapi.exceptions import (
    AlibabaCloudException,
    ServerException,
    ThrottlingException,
)
from darabonba.exceptions import UnretryableException
from darabonba.exceptions import ValidateException as DaraValidateException
from Tea.exceptions import TeaException
from Tea.exceptions import ValidateException as TeaValidateException

from notifier.errors import DeliveryError, MaybeSentError, PermanentError, TransientError, classified
from notifier.models import ErrorClass

BUSINESS_LIMIT_CONTROL = "isv.BUSINESS_LIMIT_CONTROL"
# Minute windows are counted per clock minute (Aliyun: 分钟级/小时级流控按整点统计), so 60 s
# always reaches the next window.
MINUTE_WINDOW_RETRY_AFTER = 60.0

_T, _P, _A, _B = (
    ErrorClass.TRANSIENT, ErrorClass.PERMANENT, ErrorClass.ACCOUNT, ErrorClass.RECIPIENT_BUDGET
)

# Permanent codes about the request itself, never one of its numbers: its template or signature
# (the same for every number a request carries) or our address. A request of n numbers refused
# so fails them all at once: halving it would cost 2n - 1 requests and refuse every one.
REQUEST_SCOPED = frozenset({
    "isv.SMS_TEMPLATE_ILLEGAL", "isv.SMS_SIGNATURE_ILLEGAL", "isv.SIGN_STATE_ILLEGAL",
    "isv.SMS_SIGNATURE_SCENE_ILLEGAL", "isv.SMS_SIGN_ILLEGAL",  # these two: *
    "isv.DENY_IP_RANGE",
})

#: Every code PROTOCOLS.md lists, plus a few more from Aliyun's error-code page (marked *).
TABLE: dict[str, ErrorClass] = {
    # transient: the provider is unwell or throttling the account; retry with backoff
    "isp.SYSTEM_ERROR": _T,
    "isp.GATEWAY_ERROR": _T,
    "Throttling": _T,
    "Throttling.User": _T,
    "Throttling.Api": _T,
    "InternalError": _T,
    "ServiceUnavailable": _T,
    "SignatureNonceUsed": _T,  # * a resend carries a fresh nonce
    # per-recipient rate window: refined by the message, see `business_limit_class`
    BUSINESS_LIMIT_CONTROL: _B,
    # account-wide send quotas (日/月发送限额): every SMS fails until the period resets, which
    # is the breaker's job (ACCOUNT), not one delivery's
    "isv.DAY_LIMIT_CONTROL": _A,
    "isv.MONTH_LIMIT_CONTROL": _A,
    # permanent: this request can never succeed as written
    "isv.MOBILE_NUMBER_ILLEGAL": _P,
    "isv.MOBILE_COUNT_OVER_LIMIT": _P,
    "isv.TEMPLATE_MISSING_PARAMETERS": _P,
    "isv.INVALID_PARAMETERS": _P,
    "isv.INVALID_JSON_PARAM": _P,
    "isv.PARAM_LENGTH_LIMIT": _P,
    "isv.PARAM_NOT_SUPPORT_URL": _P,
    "isv.BLACK_KEY_CONTROL_LIMIT": _P,
    "isv.SMS_CONTENT_ILLEGAL": _P,
    "isv.EXTEND_CODE_ERROR": _P,
    "isv.DOMESTIC_NUMBER_NOT_SUPPORTED": _P,
    **dict.fromkeys(REQUEST_SCOPED, _P),
    # account / auth: nothing will go out on this account until a human acts
    "isv.AMOUNT_NOT_ENOUGH": _A,
    "isv.OUT_OF_SERVICE": _A,
    "isv.PRODUCT_UN_SUBSCRIPT": _A,
    "isv.PRODUCT_UNSUBSCRIBE": _A,  # *
    "isv.ACCOUNT_NOT_EXISTS": _A,
    "isv.ACCOUNT_ABNORMAL": _A,
    "isp.RAM_PERMISSION_DENY": _A,
    "SignatureDoesNotMatch": _A,
    "InvalidAccessKeyId.NotFound": _A,
    "InvalidAccessKeyId.Inactive": _A,  # *
    "InvalidTimeStamp.Expired": _A,  # our clock is off: every request will fail the same way
    "InvalidCredentials": _A,  # * raised by the SDK itself when it has no key to sign with
}


def business_limit_class(message: str) -> tuple[ErrorClass, float | None]:
    """isv.BUSINESS_LIMIT_CONTROL: the message names the window (e.g. 触发分钟级流控Permits:1).

    Only the minute window is worth waiting for. Hour and day windows cap this number for hours,
    so the alert must go another way now. A message naming no window (older 触发业务流控) is
    treated like the day window: for notification templates the per-number cap is 50/day.
    """
    if "分钟" in message or "minute" in message.lower():
        return ErrorClass.TRANSIENT, MINUTE_WINDOW_RETRY_AFTER
    return ErrorClass.RECIPIENT_BUDGET, None


def class_of(code: str, status: int | None = None) -> ErrorClass:
    """The class of a provider code; `status` is the HTTP status of a gateway error, if any."""
    if code in TABLE:
        return TABLE[code]
    if code.startswith("isp.") or code.startswith("Throttling"):
        return ErrorClass.TRANSIENT
    if status is not None and status >= 500:
        return ErrorClass.TRANSIENT
    if status == 403:
        return ErrorClass.ACCOUNT  # this AccessKey may not send at all (module docstring)
    return ErrorClass.PERMANENT  # unknown isv.* or gateway 4xx: resending cannot help


def classify_response(
    code: str, message: str = "", retry_after: float | None = None
) -> DeliveryError:
    """A Dysmsapi answer whose `Code` is not OK (business or gateway layer) -> classified error."""
    if not code:
        # A readable answer without a Code is not Dysmsapi talking (a proxy, a captive portal);
        # it came back after the request went out, so the send may have happened.
        return MaybeSentError("InvalidResponse", message or "answer without a Code")
    if code == BUSINESS_LIMIT_CONTROL:
        # Every window caps one number: a shared request is halved until that number is alone.
        error_class, window_wait = business_limit_class(message)
        return classified(error_class, code, message, retry_after or window_wait,
                          recipient_scoped=True)
    return classified(class_of(code), code, message, retry_after,
                      recipient_scoped=False if code in REQUEST_SCOPED else None)


def classify_exception(exc: BaseException) -> DeliveryError:
    """An exception raised by the Dysmsapi SDK call -> classified error.

    The secret never reaches these exceptions (the SDK only ever sends a signature), and the
    text we keep is the provider's code and message or the transport error's own words.
    """
    if isinstance(exc, DeliveryError):
        return exc
    if isinstance(exc, AlibabaCloudException):
        return _gateway_error(exc)
    if isinstance(exc, UnretryableException):
        return _transport_error(exc.inner_exception)
    if isinstance(exc, TeaException):  # SDK-side validation before anything was sent
        return PermanentError(str(exc.code or "SDK.ValidationError"), str(exc.message or ""))
    return _transport_error(exc)


def _clean(text: str) -> str:
    """Transport errors quote the request URL, whose query holds the phone number and the
    template values: keep them out of error texts (they end up in the ledger and logs)."""
    return re.sub(r"\?\S*", "", text)[:300]


def _gateway_error(exc: AlibabaCloudException) -> DeliveryError:
    """HTTP 4xx/5xx with a JSON body: ClientException, ServerException, ThrottlingException."""
    code = str(exc.code or "")
    status = exc.status_code if isinstance(exc.status_code, int) else None
    if not code or code == "None":  # the SDK formats a missing Code as 'None'
        code = f"HTTP{status}" if status else "UnknownError"
    data = exc.data if isinstance(exc.data, dict) else {}
    message = str(data.get("Message") or data.get("message") or "")
    request_id = data.get("RequestId") or data.get("requestId")
    if request_id:
        message = f"{message} (RequestId {request_id})"  # what Aliyun support asks for
    retry_after: float | None = None
    if isinstance(exc, ThrottlingException) and exc.retry_after:
        # x-acs-retry-after is in milliseconds: darabonba feeds it straight into its
        # millisecond sleep, and darabonba-openapi's own tests send e.g. 2000 for 2 s.
        retry_after = float(exc.retry_after) / 1000.0
        error_class = class_of(code, status)
        if error_class == ErrorClass.PERMANENT:
            error_class = ErrorClass.TRANSIENT  # being told when to come back means: come back
        return classified(error_class, code, message, retry_after)
    if code == BUSINESS_LIMIT_CONTROL:
        return classify_response(code, message)
    if isinstance(exc, ServerException):
        status = status or 500
    return classified(class_of(code, status), code, message)


def causes(exc: BaseException | None) -> Iterator[BaseException]:
    """`exc` and what it wraps, was raised from or while handling (the SDK wraps what its
    request raised in `UnretryableException.inner_exception`, and re-raises transport errors as
    `RetryError(str(e))` inside its `except IOError`, so the original type is the context)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = getattr(exc, "inner_exception", None) or exc.__cause__ or exc.__context__


def _transport_error(inner: BaseException | None) -> DeliveryError:
    """No HTTP answer we could read: did the request leave this host?"""
    chain = list(causes(inner))
    text = _clean(str(inner)) if inner is not None else ""
    for exc in chain:
        if isinstance(exc, DaraValidateException | TeaValidateException):
            # e.g. RequiredArgumentException('endpoint'): raised before anything was sent
            return PermanentError("SDK.ValidationError", _clean(str(exc)))
        # The sync SDK path (requests/urllib3) first: a connect timeout also carries a bare
        # TimeoutError deeper in its chain, which alone would read as "maybe sent".
        # (urllib3's NewConnectionError subclasses its ConnectTimeoutError: refusals first.)
        if isinstance(exc, urllib3.exceptions.NewConnectionError):
            # refused, unreachable, DNS: the request never left
            return TransientError("ConnectionError", _clean(str(exc)))
        if isinstance(exc, requests.exceptions.SSLError):
            # requests raises this for a TLS failure at any point: only a refused certificate
            # is sure to be the handshake; a record failing while the answer came back is not.
            if any(isinstance(e, ssl.SSLCertVerificationError) for e in chain):
                return TransientError("ConnectionError", _clean(str(exc)))
            return MaybeSentError("TLSError", _clean(str(exc)))
        if isinstance(exc, requests.ConnectTimeout | urllib3.exceptions.ConnectTimeoutError):
            return TransientError("ConnectTimeout", _clean(str(exc)) or "connect timed out")
        if isinstance(exc, requests.ReadTimeout | urllib3.exceptions.ReadTimeoutError):
            return MaybeSentError("ReadTimeout", _clean(str(exc)) or "read timed out")
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            return TransientError("ConnectTimeout", _clean(str(exc)) or "connect timed out")
        if isinstance(exc, aiohttp.ClientConnectorError | ConnectionRefusedError):
            # refused, unreachable, DNS, TLS handshake: the request never left
            return TransientError("ConnectionError", _clean(str(exc)))
        if isinstance(exc, aiohttp.SocketTimeoutError | aiohttp.ServerTimeoutError):
            return MaybeSentError("ReadTimeout", _clean(str(exc)) or "read timed out")
        if isinstance(exc, aiohttp.ServerDisconnectedError | ConnectionResetError):
            return MaybeSentError("ServerDisconnected", _clean(str(exc)) or "disconnected")
        if isinstance(exc, TimeoutError):
            return MaybeSentError("ReadTimeout", _clean(str(exc)) or "timed out")
    # The SDK keeps only str() of some transport errors; fall back to their (aiohttp) words.
    if "Connection timeout to host" in text or "(connect timeout=" in text:
        return TransientError("ConnectTimeout", text)
    if "Cannot connect to host" in text or "Failed to establish a new connection" in text:
        return TransientError("ConnectionError", text)
    if "Failed to parse the value as json" in text:
        # The SDK drops the status of a non-JSON answer: a proxy's 502 (not sent), its 504 (the
        # backend may have accepted it) and a garbled 200 (sent) look alike. Look it up first.
        return MaybeSentError("InvalidResponse", text)
    # Anything else happened after we started sending: the SMS is not idempotent, so the
    # safe side is a lookup (one QuerySendDetails) rather than a possible duplicate page.
    name = type(inner).__name__ if inner is not None else "UnknownError"
    return MaybeSentError(name, text)
