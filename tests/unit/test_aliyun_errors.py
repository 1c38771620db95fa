"""Walks the Dysmsapi classification table (PROTOCOLS.md) and the SDK exception mapping."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable

import aiohttp
import pytest
import requests
import urllib3.exceptions
from alibabacloud_tea_openapi.exceptions import (
    ClientException,
    ServerException,
    ThrottlingException,
)
from darabonba.exceptions import RequiredArgumentException, RetryError, UnretryableException
from darabonba.policy.retry import RetryPolicyContext
from Tea.exceptions import TeaException

from notifier.channels.aliyun_errors import (
    REQUEST_SCOPED,
    TABLE,
    classify_exception,
    classify_response,
)
from notifier.errors import MaybeSentError, PermanentError, TransientError
from notifier.models import ErrorClass

T, P, A, B = (ErrorClass.TRANSIENT, ErrorClass.PERMANENT, ErrorClass.ACCOUNT,
              ErrorClass.RECIPIENT_BUDGET)

# Every code of PROTOCOLS.md's Dysmsapi table, with the class it must get.
PROTOCOLS_TABLE = {
    **dict.fromkeys(["isp.SYSTEM_ERROR", "isp.GATEWAY_ERROR", "Throttling", "Throttling.User",
                     "Throttling.Api", "InternalError", "ServiceUnavailable"], T),
    # quota: account-wide until the period resets -> the breaker's business
    "isv.DAY_LIMIT_CONTROL": A,
    "isv.MONTH_LIMIT_CONTROL": A,
    **dict.fromkeys(["isv.MOBILE_NUMBER_ILLEGAL", "isv.MOBILE_COUNT_OVER_LIMIT",
                     "isv.TEMPLATE_MISSING_PARAMETERS", "isv.INVALID_PARAMETERS",
                     "isv.INVALID_JSON_PARAM", "isv.PARAM_LENGTH_LIMIT",
                     "isv.PARAM_NOT_SUPPORT_URL", "isv.BLACK_KEY_CONTROL_LIMIT",
                     "isv.SMS_TEMPLATE_ILLEGAL", "isv.SMS_SIGNATURE_ILLEGAL",
                     "isv.SIGN_STATE_ILLEGAL", "isv.SMS_CONTENT_ILLEGAL", "isv.EXTEND_CODE_ERROR",
                     "isv.DOMESTIC_NUMBER_NOT_SUPPORTED", "isv.DENY_IP_RANGE"], P),
    **dict.fromkeys(["isv.AMOUNT_NOT_ENOUGH", "isv.OUT_OF_SERVICE", "isv.PRODUCT_UN_SUBSCRIPT",
                     "isv.ACCOUNT_NOT_EXISTS", "isv.ACCOUNT_ABNORMAL", "isp.RAM_PERMISSION_DENY",
                     "SignatureDoesNotMatch", "InvalidAccessKeyId.NotFound",
                     "InvalidTimeStamp.Expired"], A),
}


@pytest.mark.parametrize(("code", "expected"), sorted(PROTOCOLS_TABLE.items()))
def test_every_protocols_code_is_in_the_table(code: str, expected: ErrorClass) -> None:
    assert TABLE[code] is expected
    error = classify_response(code, "provider text")
    assert error.error_class is expected
    assert error.code == code and error.message == "provider text"
    assert isinstance(error, TransientError if expected is T else PermanentError)
    # ACCOUNT opens the breaker (page the owner); a bad request or a capped number does not
    assert error.trips_breaker is (expected in (T, A))


@pytest.mark.parametrize("code", sorted(REQUEST_SCOPED))
def test_a_refused_template_or_signature_is_the_whole_requests_fault(code: str) -> None:
    assert TABLE[code] is P  # permanent, and not to be halved: no number of it can be sent
    assert not classify_response(code, "provider text").recipient_scoped


@pytest.mark.parametrize("code", ["isv.MOBILE_NUMBER_ILLEGAL", "isv.DOMESTIC_NUMBER_NOT_SUPPORTED",
                                  "isv.SMS_CONTENT_ILLEGAL", "isv.UNKNOWN_NEW_CODE"])
def test_a_refusal_that_may_be_one_numbers_fault_halves_the_request(code: str) -> None:
    assert classify_response(code, "provider text").recipient_scoped


def test_table_holds_no_maybe_sent_code() -> None:
    # Only a transport failure can leave us unsure whether the SMS went out.
    assert ErrorClass.MAYBE_SENT not in set(TABLE.values())


@pytest.mark.parametrize(
    ("message", "expected", "retry_after"),
    [
        ("触发分钟级流控Permits:1", T, 60.0),
        ("触发小时级流控Permits:5", B, None),
        ("触发天级流控Permits:10", B, None),
        ("触发号码天级流控Permits:40", B, None),
        ("触发业务流控", B, None),  # no window named: treated as the day window
    ],
)
def test_business_limit_control_by_window(
    message: str, expected: ErrorClass, retry_after: float | None
) -> None:
    error = classify_response("isv.BUSINESS_LIMIT_CONTROL", message)
    assert error.error_class is expected
    assert error.retry_after == retry_after
    # the recipient's cap is not the provider being unwell; a shared request is halved
    assert error.recipient_scoped and not error.trips_breaker


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("isv.SOMETHING_NEW", P),  # unknown caller-side rejection: resending cannot help
        ("isp.SOMETHING_NEW", T),  # unknown provider-side failure: worth a retry
        ("Throttling.Something", T),
        ("WeirdNewCode", P),
    ],
)
def test_unknown_codes(code: str, expected: ErrorClass) -> None:
    assert classify_response(code).error_class is expected


def test_an_answer_without_code_may_have_been_sent() -> None:
    assert isinstance(classify_response(""), MaybeSentError)


# ---- SDK exceptions (constructed exactly as alibabacloud-tea-openapi 0.4.6 raises them) ----


def gateway(cls: type[ClientException], status: int, code: str, **extra: int) -> Exception:
    body = {"Code": code, "Message": "gateway says no", "RequestId": "REQ-1"}
    error: Exception = cls(status_code=status, code=code, request_id="REQ-1", data=body,
                           message=f"code: {status}, gateway says no", **extra)
    return error


@pytest.mark.parametrize(
    ("exc", "expected", "code"),
    [
        (gateway(ClientException, 400, "SignatureDoesNotMatch"), A, "SignatureDoesNotMatch"),
        (gateway(ClientException, 404, "InvalidAccessKeyId.NotFound"), A,
         "InvalidAccessKeyId.NotFound"),
        (gateway(ClientException, 400, "InvalidTimeStamp.Expired"), A, "InvalidTimeStamp.Expired"),
        (gateway(ClientException, 400, "MissingPhoneNumbers"), P, "MissingPhoneNumbers"),
        (gateway(ClientException, 403, "Forbidden.RAM"), A, "Forbidden.RAM"),
        (gateway(ClientException, 403, "NoPermission"), A, "NoPermission"),
        (gateway(ClientException, 400, "Throttling.User"), T, "Throttling.User"),
        (gateway(ServerException, 500, "InternalError"), T, "InternalError"),
        (gateway(ServerException, 503, "ServiceUnavailable"), T, "ServiceUnavailable"),
        (gateway(ServerException, 502, "SomethingNew"), T, "SomethingNew"),
        (gateway(ServerException, 500, "None"), T, "HTTP500"),  # SDK's text for a missing Code
    ],
)
def test_gateway_exceptions(exc: Exception, expected: ErrorClass, code: str) -> None:
    error = classify_exception(exc)
    assert error.error_class is expected
    assert error.code == code
    if code != "HTTP500":
        assert "gateway says no" in error.message and "REQ-1" in error.message


def test_throttling_exception_carries_retry_after_in_seconds() -> None:
    # x-acs-retry-after is milliseconds: the SDK sleeps that many ms before its own retries
    error = classify_exception(gateway(ThrottlingException, 400, "Throttling.User",
                                       retry_after=2500))
    assert isinstance(error, TransientError)
    assert error.retry_after == 2.5


def test_throttling_header_makes_even_an_unknown_4xx_transient() -> None:
    error = classify_exception(gateway(ThrottlingException, 400, "Flow.Whatever", retry_after=800))
    assert error.error_class is T and error.retry_after == 0.8


def sdk_wrapped(inner: Exception) -> UnretryableException:
    """What darabonba does with a transport failure: `except IOError: raise RetryError(str(e))`
    inside DaraCore.async_do_action, then UnretryableException(context) after its retry loop."""
    try:
        try:
            raise inner
        except OSError as exc:
            raise RetryError(str(exc))  # noqa: B904 - exactly what the SDK does
    except Exception as exc:  # the SDK catches everything into the retry context
        last = exc
    return UnretryableException(RetryPolicyContext(retries_attempted=1, exception=last))


def refused_connection_error() -> Exception:
    """A real aiohttp ClientConnectorError: connect to a loopback port nobody listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    async def connect() -> Exception:
        async with aiohttp.ClientSession() as session:
            try:
                await session.get(f"http://127.0.0.1:{port}/")
            except aiohttp.ClientConnectorError as exc:
                return exc
        raise AssertionError("connected to a closed port")

    return asyncio.run(connect())


@pytest.mark.parametrize(
    ("inner", "expected", "code"),
    [
        # the request left: a read timeout / a dropped answer may hide an accepted SMS
        (aiohttp.SocketTimeoutError("Timeout on reading data from socket"), ErrorClass.MAYBE_SENT,
         "ReadTimeout"),
        (ConnectionResetError(104, "Connection reset by peer"), ErrorClass.MAYBE_SENT,
         "ServerDisconnected"),
        # nothing left this host
        (aiohttp.ConnectionTimeoutError("Connection timeout to host http://x/"), T,
         "ConnectTimeout"),
    ],
)
def test_transport_errors_wrapped_by_the_sdk(
    inner: Exception, expected: ErrorClass, code: str
) -> None:
    error = classify_exception(sdk_wrapped(inner))
    assert (error.error_class, error.code) == (expected, code)


def test_refused_connection_is_transient() -> None:
    error = classify_exception(sdk_wrapped(refused_connection_error()))
    assert isinstance(error, TransientError) and error.code == "ConnectionError"


def test_refused_connection_recognised_from_text_alone() -> None:
    # The SDK keeps only str() of the original; without the context, the words still tell.
    bare = UnretryableException(RetryPolicyContext(
        retries_attempted=1, exception=RetryError("Cannot connect to host 127.0.0.1:1 ssl:False")))
    assert classify_exception(bare).code == "ConnectionError"


def test_server_disconnect_after_sending_may_have_been_sent() -> None:
    # not an OSError: escapes DaraCore's `except IOError` and is wrapped directly
    exc = UnretryableException(RetryPolicyContext(
        retries_attempted=1, exception=aiohttp.ServerDisconnectedError()))
    assert isinstance(classify_exception(exc), MaybeSentError)


def test_non_json_answer_may_have_been_sent() -> None:
    # The SDK drops the HTTP status of a body it cannot parse: a proxy's 504 (maybe accepted
    # behind it) looks like its 502, so look it up before resending.
    parse = RuntimeError('Failed to parse the value as json format, Value: "<html>502</html>".')
    exc = UnretryableException(RetryPolicyContext(retries_attempted=1, exception=parse))
    error = classify_exception(exc)
    assert isinstance(error, MaybeSentError) and error.code == "InvalidResponse"


def test_sdk_validation_error_is_permanent() -> None:
    error = classify_exception(TeaException({"code": "ParameterMissing", "message": "no"}))
    assert isinstance(error, PermanentError) and error.code == "ParameterMissing"
    # raised while composing the URL, inside the SDK's retry loop, so it arrives wrapped
    missing = UnretryableException(RetryPolicyContext(
        retries_attempted=1, exception=RequiredArgumentException("endpoint")))
    assert classify_exception(missing).error_class is P


def test_transport_error_text_keeps_the_request_query_out() -> None:
    # aiohttp quotes the whole URL, whose query holds the number and the template values
    inner = aiohttp.ConnectionTimeoutError(
        "Connection timeout to host http://dysmsapi/?PhoneNumbers=13800138000&TemplateParam=x")
    error = classify_exception(sdk_wrapped(inner))
    assert error.code == "ConnectTimeout" and "13800138000" not in str(error)


def test_unexpected_exception_is_treated_as_maybe_sent() -> None:
    # Unknown failure mid-call: one QuerySendDetails is cheaper than a duplicate page.
    assert isinstance(classify_exception(ValueError("surprise")), MaybeSentError)


def test_classified_errors_pass_through() -> None:
    error = TransientError("x")
    assert classify_exception(error) is error


# ---- the sync SDK path (requests/urllib3), which the channel uses for its pooled session ----


def sync_sdk_wrapped(call: Callable[[], object]) -> UnretryableException:
    """What DaraCore.do_action does with a transport failure of `requests`: `except IOError:
    raise RetryError(str(e))`, then UnretryableException(context) after the retry loop."""
    try:
        try:
            call()
        except OSError as exc:
            raise RetryError(str(exc))  # noqa: B904 - exactly what the SDK does
    except Exception as exc:
        return UnretryableException(RetryPolicyContext(retries_attempted=1, exception=exc))
    raise AssertionError("the call succeeded")


def test_sync_refused_connection_is_transient() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/?PhoneNumbers=13800138000"
    error = classify_exception(sync_sdk_wrapped(lambda: requests.post(url, timeout=(1, 1))))
    assert isinstance(error, TransientError) and error.code == "ConnectionError"
    assert "13800138000" not in str(error)


def test_sync_read_timeout_may_have_been_sent() -> None:
    with socket.socket() as server:  # accepts (the kernel does), never answers
        server.bind(("127.0.0.1", 0))
        server.listen()
        url = f"http://127.0.0.1:{server.getsockname()[1]}/"
        error = classify_exception(sync_sdk_wrapped(lambda: requests.post(url, timeout=(1, 0.2))))
    assert isinstance(error, MaybeSentError) and error.code == "ReadTimeout"


def test_sync_connect_timeout_is_transient_not_maybe_sent() -> None:
    # Its chain also holds a bare TimeoutError (socket.timeout), which alone means "maybe sent".
    def connect_timeout() -> None:
        try:
            raise TimeoutError("timed out")
        except TimeoutError as exc:
            raise requests.ConnectTimeout("Connection to 10.0.0.1 timed out. (connect timeout=1)"
                                          ) from exc

    error = classify_exception(sync_sdk_wrapped(connect_timeout))
    assert isinstance(error, TransientError) and error.code == "ConnectTimeout"


def test_sync_refusal_recognised_from_text_alone() -> None:
    bare = UnretryableException(RetryPolicyContext(retries_attempted=1, exception=RetryError(
        "HTTPConnectionPool(host='127.0.0.1', port=1): Max retries exceeded with url: / (Caused "
        "by NewConnectionError('Failed to establish a new connection: [Errno 111] refused'))")))
    assert classify_exception(bare).code == "ConnectionError"


@pytest.mark.parametrize(("reason", "expected", "code"), [
    # only the handshake can refuse a certificate: nothing left
    (ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] self-signed"),
     ErrorClass.TRANSIENT, "ConnectionError"),
    # any other TLS failure may come while the answer is read, after the request left
    (ssl.SSLError(1, "[SSL: DECRYPTION_FAILED_OR_BAD_RECORD_MAC] bad record mac"),
     ErrorClass.MAYBE_SENT, "TLSError"),
])
def test_sync_tls_failures(reason: ssl.SSLError, expected: ErrorClass, code: str) -> None:
    def tls_failure() -> None:  # as urllib3 and requests chain it
        try:
            raise urllib3.exceptions.SSLError(reason) from reason
        except urllib3.exceptions.SSLError as exc:
            raise requests.exceptions.SSLError(exc) from exc

    error = classify_exception(sync_sdk_wrapped(tls_failure))
    assert (error.error_class, error.code) == (expected, code)
