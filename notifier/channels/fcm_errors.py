"""The one place that classifies FCM HTTP v1 failures (PROTOCOLS.md, "FCM HTTP v1").

An FCM error body is a google.rpc.Status::

    {"error": {"code": 404, "message": "Requested entity was not found.",
               "status": "NOT_FOUND",
               "details": [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                            "errorCode": "UNREGISTERED"}]}}

The FcmError `errorCode` decides when present (`SEND_ERROR_CODES`); otherwise the HTTP status
does (`SEND_STATUSES`). The DeliveryError `code` is the errorCode, else the rpc status (e.g.
`UNAUTHENTICATED`), else `HTTP_<n>`, so a caller can act on `code == "UNREGISTERED"` (drop
that token). The OAuth token endpoint has its own small table (`TOKEN_STATUSES`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from notifier.errors import DeliveryError, classified
from notifier.models import ErrorClass

T, P, A = ErrorClass.TRANSIENT, ErrorClass.PERMANENT, ErrorClass.ACCOUNT
M = ErrorClass.MAYBE_SENT

FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
UNREGISTERED = "UNREGISTERED"  # the device token is gone: the caller should drop it

# FCM's ErrorCode enum (firebase.google.com/docs/reference/fcm/rest/v1/ErrorCode).
SEND_ERROR_CODES: Mapping[str, ErrorClass] = {
    "INVALID_ARGUMENT": P,  # bad token format, payload too big, reserved data key
    "UNREGISTERED": P,  # app uninstalled / token expired
    "SENDER_ID_MISMATCH": P,  # the token belongs to another Firebase project
    # Our APNs certificate or web-push credentials are bad: that iOS or browser token's send
    # fails (PROTOCOLS.md: permanent), and its fallback carries the alert. Not an account
    # error: the fleet-wide push breaker would shut off the Android pushes that still work.
    "THIRD_PARTY_AUTH_ERROR": P,
    "QUOTA_EXCEEDED": T,  # project or per-device rate; honour Retry-After
    "UNAVAILABLE": T,
    "INTERNAL": T,
}

# Used when the body carries no FcmError errorCode (or UNSPECIFIED_ERROR).
SEND_STATUSES: Mapping[int, ErrorClass] = {
    400: P,  # INVALID_ARGUMENT
    401: A,  # UNAUTHENTICATED even with a fresh token: the service account is refused
    403: A,  # PERMISSION_DENIED: the account lacks the role or the API is disabled
    404: A,  # NOT_FOUND without UNREGISTERED: wrong project_id or endpoint
    408: T,
    409: T,  # ABORTED
    429: T,  # RESOURCE_EXHAUSTED
    500: T,
    502: T,
    503: T,
    504: T,
}

# FCM refills its quota "in the following minute": without Retry-After, wait that long.
QUOTA_DEFAULT_RETRY_AFTER = 60.0

# OAuth2 token endpoint: 4xx is our key or our request (invalid_grant, bad signature,
# disabled account): nothing a retry fixes. 429/5xx are the endpoint's own trouble.
TOKEN_STATUSES: Mapping[int, ErrorClass] = {408: T, 429: T}

# httpx transport failures: no answer came back, so the send is retried.
TRANSPORT_ERRORS: tuple[tuple[type[Exception], ErrorClass, str], ...] = (
    (httpx.TimeoutException, T, "TIMEOUT"),  # connect, write, pool: the request never left
    (httpx.NetworkError, T, "NETWORK"),  # refused, reset, TLS handshake, DNS
    (httpx.RemoteProtocolError, T, "PROTOCOL"),
    (httpx.TransportError, T, "TRANSPORT"),
)

# On messages:send (not the token endpoint), failures while reading the answer: the request
# was written whole, and FCM may have taken and delivered it (a push arrives, its 200 is lost).
# Maybe sent. FCM has no look-up, so the pipeline still sends it again, but the records say
# it may have gone. Consulted before TRANSPORT_ERRORS.
SEND_READ_ERRORS: tuple[tuple[type[Exception], ErrorClass, str], ...] = (
    (httpx.ReadTimeout, M, "TIMEOUT"),
    (httpx.ReadError, M, "NETWORK"),  # reset while waiting for the answer
    (httpx.RemoteProtocolError, M, "PROTOCOL"),  # closed without (a whole) answer
)


# Our own deadline for a whole send (push_fcm: token, send, and a refreshed token's retry, as
# one asyncio.timeout; httpx's own timeouts bound each connect, read and write, not a request,
# so a peer dribbling its answer would otherwise hold the worker child). Running out while
# messages:send was in flight: maybe sent (it may be past the write, as in SEND_READ_ERRORS);
# while the token was asked for, nothing was sent.
DEADLINE: Mapping[bool, ErrorClass] = {False: T, True: M}  # by "messages:send in flight"

# A 2xx from messages:send without the message `name` FCM gives every push it accepts: not FCM
# answering (a captive portal's 200 HTML, a proxy), after the request went out. Whether FCM got
# it is unknown: maybe sent, as Aliyun's answer without a Code (aliyun_errors), never "sent".
NO_MESSAGE_NAME = M


@dataclass(frozen=True)
class FcmErrorBody:
    """The interesting parts of an error response; empty strings when absent."""

    status: str = ""  # rpc status, e.g. NOT_FOUND
    error_code: str = ""  # FcmError errorCode, e.g. UNREGISTERED
    message: str = ""


def parse_error_body(body: bytes | str | Mapping[str, Any] | None) -> FcmErrorBody:
    """Read a google.rpc.Status body; anything unparsable (an HTML 502 page) gives blanks."""
    data: Any = body
    if isinstance(body, bytes | str):
        try:
            data = json.loads(body or b"null")
        except ValueError:
            return FcmErrorBody()
    error = data.get("error") if isinstance(data, Mapping) else None
    if not isinstance(error, Mapping):
        return FcmErrorBody()
    error_code = ""
    details = error.get("details")
    for detail in details if isinstance(details, list) else ():
        if isinstance(detail, Mapping) and detail.get("@type") == FCM_ERROR_TYPE:
            error_code = str(detail.get("errorCode") or "")
            break
    return FcmErrorBody(
        status=str(error.get("status") or ""),
        error_code=error_code,
        message=str(error.get("message") or "")[:300],
    )


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds from now: delta-seconds or an HTTP-date (RFC 9110 10.2.3)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


def token_rejected(status: int, body: bytes | str | Mapping[str, Any] | None) -> bool:
    """A 401 about our access token (expired, revoked), worth one refresh and one retry.

    THIRD_PARTY_AUTH_ERROR is also a 401 but about APNs/web-push credentials: no refresh
    helps with it.
    """
    return status == 401 and parse_error_body(body).error_code != "THIRD_PARTY_AUTH_ERROR"


def classify_send(
    status: int,
    body: bytes | str | Mapping[str, Any] | None,
    retry_after: str | None = None,
) -> DeliveryError:
    """Classify a non-2xx answer of messages:send."""
    parsed = parse_error_body(body)
    error_class = SEND_ERROR_CODES.get(parsed.error_code)
    if error_class is None:
        error_class = SEND_STATUSES.get(status)
    if error_class is None:
        if 300 <= status < 400:
            error_class = A  # a redirect: the endpoint is misconfigured
        elif 400 <= status < 500:
            error_class = P
        else:
            error_class = T
    delay = parse_retry_after(retry_after)
    if delay is None and (status == 429 or parsed.error_code == "QUOTA_EXCEEDED"):
        delay = QUOTA_DEFAULT_RETRY_AFTER
    code = parsed.error_code or parsed.status or f"HTTP_{status}"
    message = parsed.message or f"HTTP {status} from FCM"
    return classified(error_class, code, message, delay)


def accepted_name(body: bytes) -> str:
    """The message name of a 2xx answer of messages:send; raises (`NO_MESSAGE_NAME`) when the
    answer carries none."""
    try:
        data: Any = json.loads(body or b"null")
    except ValueError:
        data = None
    name = data.get("name") if isinstance(data, Mapping) else None
    if isinstance(name, str) and name:
        return name
    raise classified(NO_MESSAGE_NAME, "INVALID_RESPONSE",
                     "2xx from the FCM endpoint without a message name: not FCM answering")


def classify_token(
    status: int, body: bytes | str | Mapping[str, Any] | None, retry_after: str | None = None
) -> DeliveryError:
    """Classify a non-2xx answer of the OAuth2 token endpoint."""
    error_class = TOKEN_STATUSES.get(status)
    if error_class is None:
        error_class = A if 400 <= status < 500 else T
    reason = ""
    data: Any = body
    if isinstance(body, bytes | str):
        try:
            data = json.loads(body or b"null")
        except ValueError:
            data = None
    if isinstance(data, Mapping):
        # RFC 6749 5.2: {"error": "invalid_grant", "error_description": "..."}
        parts = (data.get("error"), data.get("error_description"))
        reason = ": ".join(str(p) for p in parts if isinstance(p, str) and p)
    message = f"token endpoint HTTP {status}" + (f" ({reason[:300]})" if reason else "")
    return classified(error_class, f"OAUTH_HTTP_{status}", message, parse_retry_after(retry_after))


def classify_transport(exc: Exception, *, token_endpoint: bool = False) -> DeliveryError:
    """Classify an httpx failure (no HTTP answer at all)."""
    prefix = "OAUTH_" if token_endpoint else ""
    rows = TRANSPORT_ERRORS if token_endpoint else SEND_READ_ERRORS + TRANSPORT_ERRORS
    for exc_type, error_class, code in rows:
        if isinstance(exc, exc_type):
            return classified(error_class, prefix + code, _describe(exc))
    return classified(ErrorClass.TRANSIENT, prefix + "UNEXPECTED", _describe(exc))


def deadline_exceeded(budget: float, *, sending: bool) -> DeliveryError:
    """The whole send ran past its deadline (`budget` seconds); `sending`: messages:send was
    in flight (else the token request was)."""
    return classified(DEADLINE[sending], "TIMEOUT",
                      f"no answer from FCM within the send's {budget:g} s")


def _describe(exc: Exception) -> str:
    # httpx messages name the host and the OS error, never headers: no token leaks here.
    text = str(exc).strip()[:300]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
