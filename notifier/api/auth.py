"""Bearer (or HTTP basic) token check for every state-changing and reading /v1 endpoint."""

from __future__ import annotations

import base64
import binascii
import hmac
import os

from fastapi import HTTPException, Request

from notifier.errors import ConfigError

# The names of the variables holding the tokens (the tokens are only ever read from them).
API_TOKEN_ENV = "NOTIFIER_API_TOKEN"  # noqa: S105
CALLBACK_TOKEN_ENV = "NOTIFIER_CALLBACK_TOKEN"  # noqa: S105
UNAUTHORIZED = "missing or wrong credentials: send Authorization: Bearer <NOTIFIER_API_TOKEN>"
CHALLENGE = ("WWW-Authenticate", 'Bearer realm="notifier"')


def _presented(header: str) -> str | None:
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer":
        return value.strip()
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        return decoded.partition(":")[2]  # Alertmanager basic_auth: the password is the token
    return None


def token_from_env(name: str) -> str | None:
    """The token in environment variable `name`, or None when it is unset: what it guards is
    then open (loopback demos, `notifier up`).

    Set but blank is refused: that is what a missing secret looks like (`NAME=` left in the
    env file, `NAME=${TOKEN}` with TOKEN unset, `$(cat missing-file)`), and it must not quietly
    open the API. Surrounding whitespace is dropped: a token written from a file often ends in
    a newline, which no client presents (Bearer values are stripped here, Alertmanager trims
    its credentials file), so keeping it would lock every sender out."""
    value = os.environ.get(name)
    if value is None:
        return None
    if not value.strip():
        raise ConfigError(f"{name}: set but empty; set the token, or unset {name} to run "
                          f"without authentication")
    return value.strip()


def check_tokens() -> None:
    """ConfigError now for a token the API would refuse to start with."""
    token_from_env(API_TOKEN_ENV)
    token_from_env(CALLBACK_TOKEN_ENV)


class TokenAuth:
    """A FastAPI dependency; no token configured means the API is open (loopback demos)."""

    def __init__(self, token: str | None) -> None:
        self.token = token.encode() if token else None

    def allows(self, authorization: str) -> bool:
        """Does this Authorization header value carry the token?"""
        if self.token is None:
            return True
        presented = _presented(authorization)
        return presented is not None and hmac.compare_digest(presented.encode(), self.token)

    def __call__(self, request: Request) -> None:
        if not self.allows(request.headers.get("authorization", "")):
            raise HTTPException(status_code=401, detail=UNAUTHORIZED, headers=dict([CHALLENGE]))


class CallbackAuth:
    """Aliyun cannot send headers on its pushes, so callbacks carry `?token=`."""

    def __init__(self, token: str | None) -> None:
        self.token = token.encode() if token else None

    def __call__(self, request: Request) -> None:
        if self.token is None:
            return
        presented = request.query_params.get("token", "")
        if not hmac.compare_digest(presented.encode(), self.token):
            raise HTTPException(status_code=401, detail="missing or wrong ?token= on callback URL")
