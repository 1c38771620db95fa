"""Classified failures. A channel raises one of these; the pipeline decides what happens next.

Each protocol's table (channels/*_errors.py) maps its raw failures onto `DeliveryError` with an
`ErrorClass`; nothing else in the code base inspects provider error codes.
"""

from __future__ import annotations

import copy

from notifier.models import ErrorClass


class NotifierError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(NotifierError):
    """The configuration is invalid; the message names the key and the problem."""


class BrokerUnavailable(NotifierError):
    """Redis (ledger or broker) could not be reached or refused the request. Raised as itself
    by `notify()`, nothing was accepted; see AcceptOutcomeUnknown for when that is not known."""


class AcceptOutcomeUnknown(BrokerUnavailable):
    """The event was sent to Redis but its answer was lost (a timeout or a dropped connection
    after sending): it may have been accepted. Sending it again is safe only with the same
    idempotency key (`idempotency_key`, None if the accept had none): a stored first try then
    answers with its own transaction instead of paging twice.

    A BrokerUnavailable, so that `except BrokerUnavailable` keeps catching every Redis failure
    (for an alert, a fallback that may page twice beats one that never runs)."""

    def __init__(self, message: str, idempotency_key: str | None = None) -> None:
        super().__init__(message)
        self.idempotency_key = idempotency_key


class InvalidEvent(NotifierError):
    """The event cannot be accepted as given; the message names the field."""


class IdempotencyConflict(NotifierError):
    """The idempotency key was used before with a different body, by `transaction_id`."""

    def __init__(self, message: str, transaction_id: str = "") -> None:
        super().__init__(message)
        self.transaction_id = transaction_id


class DeliveryError(NotifierError):
    """A send failed. `code` is the provider's own code (e.g. `isv.AMOUNT_NOT_ENOUGH`, `550`)."""

    error_class: ErrorClass = ErrorClass.PERMANENT

    def __init__(
        self,
        code: str,
        message: str = "",
        *,
        error_class: ErrorClass | None = None,
        retry_after: float | None = None,
        recipient_scoped: bool | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message
        if error_class is not None:
            self.error_class = error_class
        # Seconds the provider asked us to wait (Retry-After, x-acs-retry-after), if any.
        self.retry_after = retry_after
        # May be about one recipient of a request rather than all of it (an invalid number,
        # one number's rate window): a request carrying several is sent again in halves.
        self.recipient_scoped = recipient_scoped if recipient_scoped is not None else \
            self.error_class in (ErrorClass.PERMANENT, ErrorClass.RECIPIENT_BUDGET)

    def redacted(self, secret: str) -> DeliveryError:
        """This error with `secret` shown as *** (servers sometimes echo what they got), and all
        else kept as classified: class, recipient scope, retry-after."""
        if not secret or (secret not in self.code and secret not in self.message):
            return self
        clean = copy.copy(self)
        clean.code = self.code.replace(secret, "***")
        clean.message = self.message.replace(secret, "***")
        clean.args = (f"{clean.code}: {clean.message}" if clean.message else clean.code,)
        return clean

    @property
    def trips_breaker(self) -> bool:
        """Failures that say the provider (not this one message or recipient) is unwell."""
        return self.error_class in (ErrorClass.TRANSIENT, ErrorClass.MAYBE_SENT, ErrorClass.ACCOUNT) \
            and not self.recipient_scoped


class TransientError(DeliveryError):
    error_class = ErrorClass.TRANSIENT


class MaybeSentError(DeliveryError):
    """The request may have reached the provider; look it up before sending again."""

    error_class = ErrorClass.MAYBE_SENT


class PermanentError(DeliveryError):
    error_class = ErrorClass.PERMANENT


class RateLimited(NotifierError):
    """Our own fleet-wide bucket is empty; retry after `retry_after` seconds."""

    def __init__(self, bucket: str, retry_after: float) -> None:
        super().__init__(f"rate limited on {bucket}; retry in {retry_after:.3f}s")
        self.bucket = bucket
        self.retry_after = retry_after


class CircuitOpen(NotifierError):
    """The provider's breaker is open; the delivery goes to fallback without a call."""

    def __init__(self, breaker: str, retry_after: float | None = None) -> None:
        super().__init__(f"circuit {breaker} is open")
        self.breaker = breaker
        self.retry_after = retry_after


_BY_CLASS: dict[ErrorClass, type[DeliveryError]] = {
    ErrorClass.TRANSIENT: TransientError,
    ErrorClass.MAYBE_SENT: MaybeSentError,
    ErrorClass.PERMANENT: PermanentError,
    ErrorClass.ACCOUNT: PermanentError,  # never retried; error_class tells the breaker
    ErrorClass.RECIPIENT_BUDGET: PermanentError,
}


def classified(error_class: ErrorClass, code: str, message: str = "",
               retry_after: float | None = None, *,
               recipient_scoped: bool | None = None) -> DeliveryError:
    """The one way a protocol table turns its verdict into an exception."""
    return _BY_CLASS[error_class](code, message, error_class=error_class, retry_after=retry_after,
                                  recipient_scoped=recipient_scoped)
