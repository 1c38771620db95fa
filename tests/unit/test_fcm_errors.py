"""Walk the FCM HTTP v1 classification tables with bodies shaped like FCM's."""

from __future__ import annotations

import email.utils
import json
from typing import Any

import httpx
import pytest

from notifier.channels.fcm_errors import (
    DEADLINE,
    FCM_ERROR_TYPE,
    QUOTA_DEFAULT_RETRY_AFTER,
    SEND_ERROR_CODES,
    SEND_READ_ERRORS,
    SEND_STATUSES,
    TRANSPORT_ERRORS,
    classify_send,
    classify_token,
    classify_transport,
    deadline_exceeded,
    parse_error_body,
    parse_retry_after,
    token_rejected,
)
from notifier.errors import MaybeSentError, PermanentError, TransientError
from notifier.models import ErrorClass

# The HTTP status FCM pairs with each errorCode (FCM's ErrorCode reference).
STATUS_OF = {
    "INVALID_ARGUMENT": 400,
    "UNREGISTERED": 404,
    "SENDER_ID_MISMATCH": 403,
    "THIRD_PARTY_AUTH_ERROR": 401,
    "QUOTA_EXCEEDED": 429,
    "UNAVAILABLE": 503,
    "INTERNAL": 500,
}
RPC = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
       404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE"}


def fcm_body(status: int, error_code: str | None = None) -> bytes:
    error: dict[str, Any] = {"code": status, "message": "Requested entity was not found.",
                             "status": RPC.get(status, "UNKNOWN")}
    if error_code:
        error["details"] = [{"@type": FCM_ERROR_TYPE, "errorCode": error_code}]
    return json.dumps({"error": error}).encode()


def test_protocols_md_classes() -> None:
    permanent = ("INVALID_ARGUMENT", "SENDER_ID_MISMATCH", "UNREGISTERED", "THIRD_PARTY_AUTH_ERROR")
    assert all(SEND_ERROR_CODES[c] is ErrorClass.PERMANENT for c in permanent)
    transient = ("QUOTA_EXCEEDED", "INTERNAL", "UNAVAILABLE")
    assert all(SEND_ERROR_CODES[c] is ErrorClass.TRANSIENT for c in transient)


@pytest.mark.parametrize(("error_code", "expected"), sorted(SEND_ERROR_CODES.items()))
def test_fcm_error_codes_follow_the_table(error_code: str, expected: ErrorClass) -> None:
    error = classify_send(STATUS_OF[error_code], fcm_body(STATUS_OF[error_code], error_code))
    assert error.error_class is expected
    assert error.code == error_code
    assert isinstance(error, TransientError if expected is ErrorClass.TRANSIENT else PermanentError)


@pytest.mark.parametrize(("status", "expected"), sorted(SEND_STATUSES.items()))
def test_statuses_without_an_fcm_error_code_follow_the_table(
    status: int, expected: ErrorClass
) -> None:
    error = classify_send(status, fcm_body(status))
    assert error.error_class is expected
    assert error.code == RPC.get(status, "UNKNOWN")


def test_the_error_code_is_found_among_other_details() -> None:
    body = {"error": {"code": 400, "status": "INVALID_ARGUMENT", "message": "bad token",
                      "details": [{"@type": "type.googleapis.com/google.rpc.BadRequest",
                                   "fieldViolations": [{"field": "message.token"}]},
                                  {"@type": FCM_ERROR_TYPE, "errorCode": "INVALID_ARGUMENT"}]}}
    parsed = parse_error_body(json.dumps(body))
    assert (parsed.status, parsed.error_code, parsed.message) == (
        "INVALID_ARGUMENT", "INVALID_ARGUMENT", "bad token")


@pytest.mark.parametrize(
    ("status", "expected"),
    [(502, ErrorClass.TRANSIENT), (599, ErrorClass.TRANSIENT), (418, ErrorClass.PERMANENT),
     (302, ErrorClass.ACCOUNT)],
)
def test_unparsable_bodies_fall_back_on_the_status(status: int, expected: ErrorClass) -> None:
    error = classify_send(status, b"<html><title>Error 502 (Server Error)!!1</title></html>")
    assert error.error_class is expected
    assert error.code == f"HTTP_{status}"


def test_unregistered_is_permanent_and_says_so_in_its_code() -> None:
    error = classify_send(404, fcm_body(404, "UNREGISTERED"))
    assert isinstance(error, PermanentError)
    assert error.code == "UNREGISTERED"


@pytest.mark.parametrize("status", [429, 500, 503])
def test_retry_after_is_honoured(status: int) -> None:
    error = classify_send(status, fcm_body(status), retry_after="17")
    assert error.error_class is ErrorClass.TRANSIENT
    assert error.retry_after == 17.0


def test_quota_without_retry_after_waits_for_the_next_quota_minute() -> None:
    error = classify_send(429, fcm_body(429, "QUOTA_EXCEEDED"))
    assert error.retry_after == QUOTA_DEFAULT_RETRY_AFTER
    assert classify_send(503, fcm_body(503, "UNAVAILABLE")).retry_after is None


def test_retry_after_forms() -> None:
    now = 1_800_000_000.0
    http_date = email.utils.formatdate(now + 90, usegmt=True)
    assert parse_retry_after(http_date, now=now) == pytest.approx(90.0)
    assert parse_retry_after("2.5") == 2.5
    assert parse_retry_after("-3") == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


def test_only_a_token_401_asks_for_a_fresh_token() -> None:
    assert token_rejected(401, fcm_body(401))
    assert not token_rejected(401, fcm_body(401, "THIRD_PARTY_AUTH_ERROR"))
    assert not token_rejected(403, fcm_body(403))


@pytest.mark.parametrize(
    ("status", "expected"),
    [(400, ErrorClass.ACCOUNT), (401, ErrorClass.ACCOUNT), (403, ErrorClass.ACCOUNT),
     (408, ErrorClass.TRANSIENT), (429, ErrorClass.TRANSIENT), (500, ErrorClass.TRANSIENT),
     (503, ErrorClass.TRANSIENT)],
)
def test_token_endpoint_failures(status: int, expected: ErrorClass) -> None:
    body = json.dumps({"error": "invalid_grant", "error_description": "Invalid JWT Signature."})
    error = classify_token(status, body, retry_after="5")
    assert error.error_class is expected
    assert error.code == f"OAUTH_HTTP_{status}"
    assert "invalid_grant" in error.message
    assert error.retry_after == 5.0


REQUEST = httpx.Request("POST", "https://fcm.example/v1/projects/p/messages:send")


@pytest.mark.parametrize(
    ("exc_type", "expected", "code"), TRANSPORT_ERRORS,
    ids=[t.__name__ for t, _, _ in TRANSPORT_ERRORS],
)
def test_transport_errors_follow_the_table(
    exc_type: type[Exception], expected: ErrorClass, code: str
) -> None:
    exc = exc_type("boom", request=REQUEST)  # type: ignore[call-arg]
    error = classify_transport(exc, token_endpoint=True)
    assert (error.error_class, error.code) == (expected, f"OAUTH_{code}")
    if not any(issubclass(exc_type, t) for t, _, _ in SEND_READ_ERRORS):
        assert (classify_transport(exc).error_class, classify_transport(exc).code) == (
            expected, code)


@pytest.mark.parametrize(
    ("exc_type", "expected", "code"), SEND_READ_ERRORS,
    ids=[t.__name__ for t, _, _ in SEND_READ_ERRORS],
)
def test_read_failures_on_messages_send_follow_their_table(
    exc_type: type[Exception], expected: ErrorClass, code: str
) -> None:
    exc = exc_type("boom", request=REQUEST)  # type: ignore[call-arg]
    error = classify_transport(exc)
    assert (error.error_class, error.code) == (expected, code)
    assert type(error) is MaybeSentError
    # The token request is not the push: the same failure there sent nothing.
    assert classify_transport(exc, token_endpoint=True).error_class is ErrorClass.TRANSIENT


def test_real_transport_failures() -> None:
    # The request never left: transient wherever it happens.
    for exc in (httpx.ConnectError("refused", request=REQUEST),
                httpx.ConnectTimeout("slow connect", request=REQUEST),
                httpx.WriteTimeout("slow write", request=REQUEST)):
        assert classify_transport(exc).error_class is ErrorClass.TRANSIENT
    # Lost while reading messages:send's answer: FCM may have the push.
    for exc in (httpx.ReadTimeout("slow", request=REQUEST),
                httpx.ReadError("reset", request=REQUEST),
                httpx.RemoteProtocolError("Server disconnected", request=REQUEST)):
        assert classify_transport(exc).error_class is ErrorClass.MAYBE_SENT
        assert classify_transport(exc, token_endpoint=True).error_class is ErrorClass.TRANSIENT


def test_no_transport_row_is_shadowed() -> None:
    for table in (TRANSPORT_ERRORS, SEND_READ_ERRORS):
        for i, (later, _, _) in enumerate(table):
            assert not any(issubclass(later, earlier) for earlier, _, _ in table[:i])


def test_the_send_s_own_deadline_is_classified_by_the_table() -> None:
    for sending in (False, True):
        error = deadline_exceeded(2.0, sending=sending)
        assert (error.error_class, error.code) == (DEADLINE[sending], "TIMEOUT")
        assert "2 s" in error.message
    assert DEADLINE == {False: ErrorClass.TRANSIENT, True: ErrorClass.MAYBE_SENT}
