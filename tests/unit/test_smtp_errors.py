"""Walk the SMTP classification tables: every row, the fallbacks, and the table's own shape."""

from __future__ import annotations

import ssl

import aiosmtplib
import pytest

from notifier.channels.smtp_errors import (
    AFTER_DATA,
    EXCEPTIONS,
    REPLY_CODES,
    classify,
    reply_class,
)
from notifier.errors import DeliveryError, MaybeSentError, PermanentError, TransientError
from notifier.models import ErrorClass

EXPECTED_TYPE = {
    ErrorClass.TRANSIENT: TransientError,
    ErrorClass.PERMANENT: PermanentError,
    ErrorClass.ACCOUNT: PermanentError,  # never retried, but trips the breaker
}


def check(error: DeliveryError, error_class: ErrorClass, code: str) -> None:
    assert error.error_class is error_class
    assert type(error) is EXPECTED_TYPE[error_class]
    assert error.code == code


def test_the_brief_s_codes_are_in_the_table() -> None:
    for code in (421, 450, 451, 452):
        assert REPLY_CODES[code] is ErrorClass.TRANSIENT
    for code in (550, 551, 553, 554):
        assert REPLY_CODES[code] is ErrorClass.PERMANENT
    assert REPLY_CODES[535] is ErrorClass.ACCOUNT
    assert REPLY_CODES[530] is ErrorClass.ACCOUNT


@pytest.mark.parametrize(("code", "expected"), sorted(REPLY_CODES.items()))
def test_replies_to_rcpt_and_data_follow_the_table(code: int, expected: ErrorClass) -> None:
    refused = aiosmtplib.SMTPRecipientRefused(code, "5.1.1 reason", "bob@example.com")
    check(classify(aiosmtplib.SMTPRecipientsRefused([refused])), expected, str(code))
    check(classify(refused), expected, str(code))
    check(classify(aiosmtplib.SMTPDataError(code, "reason")), expected, str(code))


@pytest.mark.parametrize("code", [450, 451, 452])
def test_a_4xx_to_rcpt_is_about_that_mailbox_and_does_not_trip_the_breaker(code: int) -> None:
    # A full or greylisted mailbox is one recipient's trouble: retried, but never counted
    # against the fleet-wide email breaker (one full mailbox would shut email off for all).
    refused = aiosmtplib.SMTPRecipientRefused(code, "4.2.2 mailbox full", "bob@example.com")
    for exc in (refused, aiosmtplib.SMTPRecipientsRefused([refused])):
        error = classify(exc)
        check(error, ErrorClass.TRANSIENT, str(code))
        assert error.recipient_scoped and not error.trips_breaker


@pytest.mark.parametrize(
    "exc",
    [aiosmtplib.SMTPSenderRefused(451, "try later", "notifier@example.com"),
     aiosmtplib.SMTPDataError(451, "local error in processing"),
     aiosmtplib.SMTPConnectResponseError(421, "too busy"),
     aiosmtplib.SMTPRecipientRefused(421, "4.3.2 shutting down", "bob@example.com")],
    ids=lambda e: type(e).__name__,
)
def test_a_4xx_outside_rcpt_is_about_the_server_and_trips_the_breaker(
    exc: aiosmtplib.SMTPResponseException,
) -> None:
    error = classify(exc)
    assert not error.recipient_scoped and error.trips_breaker


SESSION_LEVEL = [
    aiosmtplib.SMTPSenderRefused(550, "sender rejected", "notifier@example.com"),
    aiosmtplib.SMTPHeloError(550, "go away"),
    aiosmtplib.SMTPAuthenticationError(535, "5.7.8 bad credentials"),
    aiosmtplib.SMTPConnectResponseError(554, "no SMTP service here"),
    aiosmtplib.SMTPResponseException(502, "STARTTLS not implemented"),
]


@pytest.mark.parametrize("exc", SESSION_LEVEL, ids=lambda e: type(e).__name__)
def test_a_5xx_outside_rcpt_and_data_refuses_every_message_so_it_is_account(
    exc: aiosmtplib.SMTPResponseException,
) -> None:
    check(classify(exc), ErrorClass.ACCOUNT, str(exc.code))


def test_552_to_mail_from_is_this_message_too_big_not_our_sender() -> None:
    error = classify(aiosmtplib.SMTPSenderRefused(
        552, "Error: message size exceeds fixed maximum message size", "notifier@example.com"))
    check(error, ErrorClass.PERMANENT, "552")
    assert not error.trips_breaker


@pytest.mark.parametrize(
    "exc",
    [
        aiosmtplib.SMTPSenderRefused(451, "try later", "notifier@example.com"),
        aiosmtplib.SMTPConnectResponseError(421, "too busy"),
        aiosmtplib.SMTPAuthenticationError(454, "temporary auth failure"),
        aiosmtplib.SMTPResponseException(454, "TLS not available due to temporary reason"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_a_4xx_anywhere_is_transient(exc: aiosmtplib.SMTPResponseException) -> None:
    check(classify(exc), ErrorClass.TRANSIENT, str(exc.code))


@pytest.mark.parametrize(
    ("code", "expected"),
    [(459, ErrorClass.TRANSIENT), (599, ErrorClass.PERMANENT), (354, ErrorClass.TRANSIENT),
     (250, ErrorClass.TRANSIENT)],
)
def test_codes_outside_the_table_fall_back_on_their_first_digit(
    code: int, expected: ErrorClass
) -> None:
    assert code not in REPLY_CODES
    assert reply_class(code) is expected


def _sample(exc_type: type[BaseException]) -> BaseException:
    return exc_type("boom")


@pytest.mark.parametrize(
    ("exc_type", "expected", "code"), EXCEPTIONS, ids=[t.__name__ for t, _, _ in EXCEPTIONS]
)
def test_failures_without_a_reply_follow_the_table(
    exc_type: type[BaseException], expected: ErrorClass, code: str
) -> None:
    error = classify(_sample(exc_type))
    check(error, expected, code)
    assert "boom" in error.message


@pytest.mark.parametrize(
    ("exc_type", "expected", "code"), AFTER_DATA, ids=[t.__name__ for t, _, _ in AFTER_DATA]
)
def test_losing_the_session_after_data_follows_its_table(
    exc_type: type[BaseException], expected: ErrorClass, code: str
) -> None:
    # Once DATA went out the server may have the message: maybe sent, not transient.
    error = classify(_sample(exc_type), data_sent=True)
    assert (error.error_class, error.code) == (expected, code)
    assert type(error) is MaybeSentError
    assert classify(_sample(exc_type)).error_class is ErrorClass.TRANSIENT  # before DATA


def test_a_reply_after_data_is_still_read_from_the_reply_table() -> None:
    # The server answered: its verdict is known, nothing "maybe" about it.
    error = classify(aiosmtplib.SMTPDataError(421, "shutting down"), data_sent=True)
    assert (error.error_class, error.code) == (ErrorClass.TRANSIENT, "421")
    error = classify(aiosmtplib.SMTPDataError(554, "rejected"), data_sent=True)
    assert error.error_class is ErrorClass.PERMANENT


def test_no_row_is_shadowed_by_an_earlier_one() -> None:
    for table in (EXCEPTIONS, AFTER_DATA):
        for i, (later, _, _) in enumerate(table):
            for earlier, _, _ in table[:i]:
                assert not issubclass(later, earlier), f"{later.__name__} never reached"


def test_real_network_errors_are_transient() -> None:
    for exc in (ConnectionRefusedError(111, "refused"), ConnectionResetError(104, "reset"),
                TimeoutError(), ssl.SSLCertVerificationError("self-signed certificate")):
        assert classify(exc).error_class is ErrorClass.TRANSIENT


def test_an_implicit_tls_handshake_failure_is_named_tls() -> None:
    exc = aiosmtplib.SMTPConnectError("Error connecting to 127.0.0.1 on port 465")
    exc.__cause__ = ssl.SSLError("WRONG_VERSION_NUMBER")
    check(classify(exc), ErrorClass.TRANSIENT, "TLS")


def test_an_already_classified_error_passes_through() -> None:
    error = PermanentError("NO_PASSWORD", "x", error_class=ErrorClass.ACCOUNT)
    assert classify(error) is error


def test_anything_unknown_is_retried() -> None:
    check(classify(RuntimeError("odd")), ErrorClass.TRANSIENT, "UNEXPECTED")
