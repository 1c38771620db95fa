"""The one place that classifies SMTP failures (aiosmtplib exceptions and reply codes).

Two tables, walked by tests/unit/test_smtp_errors.py:

- `REPLY_CODES`: an SMTP reply code -> ErrorClass. Codes not listed fall back to their class
  digit (4xx transient, 5xx permanent, anything else is a confused session: transient).
- `EXCEPTIONS`: failures without a reply code (network, TLS, timeouts, missing extensions),
  first `isinstance` match wins, so subclasses come before their bases.

A permanent (5xx) reply is about *this message* only when the server gave it to RCPT or DATA,
or 552 to MAIL FROM (the message's declared SIZE is over the server's limit).
The same reply to the greeting, EHLO, STARTTLS, AUTH or MAIL FROM (our configured sender) says
the server will refuse every message we send: that is an ACCOUNT failure (fall back and trip
the breaker), not a PERMANENT one.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping

import aiosmtplib

from notifier.errors import DeliveryError, classified
from notifier.models import ErrorClass

T, P, A = ErrorClass.TRANSIENT, ErrorClass.PERMANENT, ErrorClass.ACCOUNT
M = ErrorClass.MAYBE_SENT

# RFC 5321 section 4.2 plus RFC 3207 (STARTTLS), RFC 4954 (AUTH), RFC 7504 (null MX).
REPLY_CODES: Mapping[int, ErrorClass] = {
    421: T,  # service not available, closing the channel (also greylisting "try later")
    432: A,  # a password transition is needed
    450: T,  # mailbox unavailable (busy, greylisted)
    451: T,  # local error in processing
    452: T,  # insufficient storage / too many recipients this session
    454: T,  # TLS or temporary authentication failure
    455: T,  # server unable to accommodate parameters now
    500: P,  # syntax error, command unrecognised
    501: P,  # syntax error in parameters (e.g. a malformed address)
    502: P,  # command not implemented
    503: P,  # bad sequence of commands
    504: P,  # parameter not implemented
    521: P,  # host does not accept mail
    530: A,  # authentication required: we are configured without credentials it needs
    534: A,  # authentication mechanism is too weak
    535: A,  # authentication credentials invalid
    538: A,  # encryption required for the requested authentication mechanism
    550: P,  # mailbox unavailable (no such user, policy rejection)
    551: P,  # user not local
    552: P,  # exceeded storage allocation / message too big
    553: P,  # mailbox name not allowed
    554: P,  # transaction failed (content rejected, blocklisted)
    555: P,  # MAIL/RCPT parameters not recognised
    556: P,  # domain does not accept mail
}

# Exceptions raised for replies about this one message; every other reply exception is
# about the session (see the module docstring).
_MESSAGE_LEVEL: tuple[type[aiosmtplib.SMTPResponseException], ...] = (
    aiosmtplib.SMTPRecipientRefused,
    aiosmtplib.SMTPDataError,
)

# Replies to MAIL FROM that are about this message, not our sender: 552 there refuses the
# SIZE= aiosmtplib declares whenever the server advertises SIZE (RFC 1870 section 6.1), so
# this message is too big and every smaller one still goes. Permanent for it alone.
_MESSAGE_LEVEL_MAIL_REPLIES = frozenset({552})

# Replies to RCPT concern one mailbox, whatever their class: a 4xx there is that mailbox full
# (452), greylisted (450/451) or busy, not the server unwell. Recipient-scoped, so retrying one
# recipient's delivery never counts against the fleet-wide `email:smtp` breaker (fail_max
# retries of one full mailbox would otherwise shut email off for everyone). The same 4xx to
# MAIL, DATA, EHLO or the greeting (421) is about the session and still trips it.
_RECIPIENT_LEVEL: tuple[type[aiosmtplib.SMTPResponseException], ...] = (
    aiosmtplib.SMTPRecipientRefused,
)
# Except 421: the server closing the session (RFC 5321 section 3.8), whichever command it
# answers, says nothing of the mailbox; at RCPT too it is the server unwell.
_SESSION_CLOSING = 421

# (exception type, class, code). Order matters: first match wins.
EXCEPTIONS: tuple[tuple[type[BaseException], ErrorClass, str], ...] = (
    (aiosmtplib.SMTPConnectTimeoutError, T, "CONNECT_TIMEOUT"),
    (aiosmtplib.SMTPTimeoutError, T, "TIMEOUT"),
    (aiosmtplib.SMTPConnectError, T, "CONNECT"),  # refused, unreachable, TLS handshake
    (aiosmtplib.SMTPServerDisconnected, T, "DISCONNECTED"),
    # A non-ASCII address and a server without SMTPUTF8: this address can never go this way.
    (aiosmtplib.SMTPNotSupported, P, "NOT_SUPPORTED"),
    # The server lacks STARTTLS or AUTH that our config requires: fix the config.
    (aiosmtplib.SMTPException, A, "SMTP_CONFIG"),
    # Raised bare by a STARTTLS upgrade (implicit TLS wraps them in SMTPConnectError).
    (ssl.SSLError, T, "TLS"),
    (TimeoutError, T, "TIMEOUT"),
    (ConnectionError, T, "CONNECTION"),
    (OSError, T, "NETWORK"),
    # aiosmtplib / email refuse addresses or headers with CR, LF or other unsafe characters.
    (ValueError, P, "INVALID_MESSAGE"),
)


# Once the DATA command has gone out, losing the session (no reply in time, a dropped
# connection, our own deadline) leaves the message's fate unknown: the server may have its
# final dot and have queued it. aiosmtplib writes DATA, the message and the dot in one call,
# so the wait for 354 and the wait for the final 250 cannot be told apart: both count as maybe
# sent (honest, if cautious). SMTP has no look-up, so the pipeline still sends it again; the
# stable Message-ID lets mail clients show it once. Consulted before EXCEPTIONS.
AFTER_DATA: tuple[tuple[type[BaseException], ErrorClass, str], ...] = (
    (aiosmtplib.SMTPTimeoutError, M, "TIMEOUT"),
    (aiosmtplib.SMTPServerDisconnected, M, "DISCONNECTED"),
    (TimeoutError, M, "TIMEOUT"),
    (OSError, M, "NETWORK"),  # a reset or a TLS failure mid-stream
)


def reply_class(code: int) -> ErrorClass:
    """The class of one SMTP reply code, from the table or its first digit."""
    if code in REPLY_CODES:
        return REPLY_CODES[code]
    if 400 <= code < 500:
        return ErrorClass.TRANSIENT
    if 500 <= code < 600:
        return ErrorClass.PERMANENT
    return ErrorClass.TRANSIENT  # 2xx/3xx where an error was expected: the session got lost


def _from_reply(exc: aiosmtplib.SMTPResponseException) -> DeliveryError:
    error_class = reply_class(exc.code)
    message_level = isinstance(exc, _MESSAGE_LEVEL) or (
        isinstance(exc, aiosmtplib.SMTPSenderRefused) and exc.code in _MESSAGE_LEVEL_MAIL_REPLIES)
    if error_class is ErrorClass.PERMANENT and not message_level:
        error_class = ErrorClass.ACCOUNT
    # None: the class decides
    scoped = True if isinstance(exc, _RECIPIENT_LEVEL) and exc.code != _SESSION_CLOSING else None
    return classified(error_class, str(exc.code), exc.message.strip(), recipient_scoped=scoped)


def classify(exc: BaseException, *, data_sent: bool = False) -> DeliveryError:
    """Map any failure of an SMTP send onto a classified `DeliveryError`. `data_sent`: the
    DATA command had gone out when it failed (see AFTER_DATA)."""
    if isinstance(exc, DeliveryError):
        return exc
    if data_sent and not isinstance(exc, aiosmtplib.SMTPResponseException):
        for exc_type, error_class, code in AFTER_DATA:
            if isinstance(exc, exc_type):
                return classified(error_class, code, _describe(exc))
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        # We send one recipient per message, so the first refusal is the refusal.
        if exc.recipients:
            return _from_reply(exc.recipients[0])
        return classified(ErrorClass.PERMANENT, "RECIPIENTS_REFUSED", "all recipients refused")
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return _from_reply(exc)
    for exc_type, error_class, code in EXCEPTIONS:
        if isinstance(exc, exc_type):
            tls_connect = code == "CONNECT" and isinstance(exc.__cause__, ssl.SSLError)
            # Say why an implicit-TLS connect failed.
            return classified(error_class, "TLS" if tls_connect else code, _describe(exc))
    # Anything else is a bug or an environment problem we have no table entry for; retrying
    # is the safe default and the breaker notices if it keeps happening.
    return classified(ErrorClass.TRANSIENT, "UNEXPECTED", _describe(exc))


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
