"""Bearer (or HTTP basic) token check for every state-changing and reading /v1 endpoint."""

from __future__ import annotations

import base64
import binascii
import hmac

from fastapi import HTTPException, Request

from notifier.tokens import API_TOKEN_ENV, CALLBACK_TOKEN_ENV, check_tokens, token_from_env

__all__ = ["API_TOKEN_ENV", "CALLBACK_TOKEN_ENV", "CallbackAuth", "TokenAuth", "check_tokens",
           "token_from_env"]

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
