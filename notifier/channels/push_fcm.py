"""Mobile push over FCM HTTP v1, authenticated as a service account (OAuth2 JWT-bearer).

The access token comes from the key file's `token_uri` (a fake in tests): we sign the JWT
assertion ourselves with `cryptography` and post it with httpx, because google-auth's
refresh is synchronous and would block the event loop for a whole HTTP round trip. The
token is cached in this object (so per process) until five minutes before it expires.

No HTTP client or event loop exists before `send()` runs (Celery forks after import and
construction); each send uses its own short-lived httpx client, correct on any loop.
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from notifier.channels.base import Channel, ChannelContext, ChannelLimits, send_budget
from notifier.channels.fcm_errors import (
    accepted_name,
    classify_send,
    classify_token,
    classify_transport,
    deadline_exceeded,
    token_rejected,
)
from notifier.config import FcmProvider
from notifier.errors import PermanentError
from notifier.models import ErrorClass, Outgoing, Receipt

SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
DEFAULT_TOKEN_URI = "https://oauth2.googleapis.com/token"  # noqa: S105 - a URL, not a secret
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
ASSERTION_LIFETIME = 3600  # the longest Google accepts
REFRESH_MARGIN = 300.0  # renew this long before expiry, so no request carries a dying token


# Loading the CA bundle costs ~60 ms of CPU; an httpx client built without a context does it
# every time, on the event loop. One context per process, built off the loop, is shared by
# every client (an SSLContext holds no connection and survives a fork).
_tls_context: ssl.SSLContext | None = None


async def _shared_tls_context() -> ssl.SSLContext:
    global _tls_context  # noqa: PLW0603 - a per-process cache, set once
    if _tls_context is None:
        _tls_context = await asyncio.to_thread(httpx.create_ssl_context)
    return _tls_context


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class KeyFileError(ValueError):
    """The key file is unusable. The message names the problem and never quotes the file
    (the parser errors it replaces can carry fragments of the private key)."""


@dataclass(frozen=True)
class ServiceAccount:
    """The parts of a service-account key file we use. The key never shows in a repr."""

    client_email: str
    token_uri: str
    key_id: str
    private_key: rsa.RSAPrivateKey = field(repr=False)

    @classmethod
    def from_file(cls, path: str | Path) -> ServiceAccount:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise KeyFileError(exc.strerror or "cannot read it") from None
        except UnicodeDecodeError:
            # A ValueError, not an OSError: a wrong file (a DER key, a binary) would otherwise
            # escape unclassified and be retried as "unexpected", maybe sent, for max_attempts.
            raise KeyFileError("not UTF-8 text") from None
        try:
            data = json.loads(text)
        except ValueError:
            raise KeyFileError("not valid JSON") from None
        if not isinstance(data, dict):
            raise KeyFileError("not a JSON object")
        missing = [k for k in ("client_email", "private_key") if not data.get(k)]
        if missing:
            raise KeyFileError(f"missing {', '.join(missing)}")
        try:
            key = serialization.load_pem_private_key(str(data["private_key"]).encode(), None)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise KeyFileError("private_key is not an unencrypted PEM private key") from None
        if not isinstance(key, rsa.RSAPrivateKey):
            raise KeyFileError("private_key is not an RSA key")
        return cls(
            client_email=str(data["client_email"]),
            token_uri=str(data.get("token_uri") or DEFAULT_TOKEN_URI),
            key_id=str(data.get("private_key_id") or ""),
            private_key=key,
        )

    def assertion(self, now: float) -> str:
        """A signed RS256 JWT asking `token_uri` for a firebase.messaging token."""
        header: dict[str, str] = {"alg": "RS256", "typ": "JWT"}
        if self.key_id:
            header["kid"] = self.key_id
        issued = int(now)
        claims = {
            "iss": self.client_email,
            "scope": SCOPE,
            "aud": self.token_uri,
            "iat": issued,
            "exp": issued + ASSERTION_LIFETIME,
        }
        signing_input = ".".join(
            _b64url(json.dumps(part, separators=(",", ":")).encode()) for part in (header, claims)
        )
        signature = self.private_key.sign(
            signing_input.encode("ascii"), padding.PKCS1v15(), hashes.SHA256()
        )
        return f"{signing_input}.{_b64url(signature)}"


async def _request(
    client: httpx.AsyncClient, url: str, *, token_endpoint: bool = False, **kwargs: Any
) -> httpx.Response:
    try:
        return await client.post(url, **kwargs)
    except httpx.HTTPError as exc:
        error = classify_transport(exc, token_endpoint=token_endpoint)
    # Raised outside the except block so the httpx exception is not chained onto ours as
    # __context__: its request carries the bearer token or the signed JWT assertion.
    raise error


@dataclass
class _AccessToken:
    value: str = field(repr=False)
    expires_at: float  # time.monotonic() clock


class FcmPush(Channel):
    channel = "push"
    # FCM caps a message at 4096 bytes; 1000 CJK characters are ~3000 bytes of UTF-8,
    # leaving room for the title and the data payload.
    limits = ChannelLimits(address="push_token", body_maxlen=1000, title_maxlen=100)

    def __init__(self, config: FcmProvider, context: ChannelContext) -> None:
        super().__init__(config.name)
        del context  # FCM needs no Redis and no environment secrets: the key file is the secret
        self._config = config
        self._account: ServiceAccount | None = None
        self._token: _AccessToken | None = None
        self.token_fetches = 0  # how many tokens this process asked for (metrics, tests)

    def __repr__(self) -> str:
        return f"FcmPush({self._config.name!r}, project={self._config.project_id!r})"

    @property
    def send_url(self) -> str:
        base = self._config.endpoint.rstrip("/")
        return f"{base}/v1/projects/{self._config.project_id}/messages:send"

    def payload(self, message: Outgoing) -> dict[str, Any]:
        rendered = message.rendered
        # Our ids go last so a sender's data cannot overwrite what correlates the receipt.
        data = {**message.data, "transaction_id": message.transaction_id,
                "delivery_id": message.delivery_id}
        return {
            "message": {
                "token": message.address,
                "notification": {"title": rendered.subject, "body": rendered.text},
                "data": data,
                "android": {"priority": "high"},
                "apns": {"headers": {"apns-priority": "10"}},
            }
        }

    async def send(self, message: Outgoing) -> Receipt:
        body = self.payload(message)
        tls = await _shared_tls_context()
        budget = self.send_budget
        sending = False  # messages:send in flight: running out then may leave it sent
        async with httpx.AsyncClient(timeout=self._config.timeout, verify=tls) as client:
            try:
                # httpx's timeout bounds each connect, read and write, not a request: a peer
                # dribbling its answer byte by byte would hold the worker child until Celery's
                # time limits. One deadline for everything this send does, as SMTP has.
                async with asyncio.timeout(budget):
                    token = await self._access_token(client)
                    sending = True
                    response = await self._post(client, token, body)
                    sending = False
                    if token_rejected(response.status_code, response.content):
                        # Revoked or expired early (clock skew, key rotation): one fresh token,
                        # one more try; a second 401 is classified (ACCOUNT) below.
                        self._token = None
                        token = await self._access_token(client)
                        sending = True
                        response = await self._post(client, token, body)
                        sending = False
            except TimeoutError:
                raise deadline_exceeded(budget, sending=sending) from None
        if response.is_success:
            return Receipt(provider_message_id=accepted_name(response.content))
        raise classify_send(
            response.status_code, response.content, response.headers.get("Retry-After")
        )

    @property
    def send_budget(self) -> float:
        """The deadline for a whole send: up to four requests (token, send, and after a
        rejected token a fresh one and the send again)."""
        return send_budget(self._config.timeout, 4)

    async def _post(
        self, client: httpx.AsyncClient, token: str, body: Mapping[str, Any]
    ) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"}
        return await _request(client, self.send_url, json=body, headers=headers)

    def _load_account(self) -> ServiceAccount:
        if self._account is None:
            path = self._config.credentials_file
            try:
                self._account = ServiceAccount.from_file(path)
            except KeyFileError as exc:
                raise PermanentError(
                    "CREDENTIALS",
                    f"cannot use service-account key file {path}: {exc}",
                    error_class=ErrorClass.ACCOUNT,
                ) from None
        return self._account

    async def _access_token(self, client: httpx.AsyncClient) -> str:
        cached = self._token
        if cached is not None and time.monotonic() < cached.expires_at - REFRESH_MARGIN:
            return cached.value
        account = self._load_account()
        form = {"grant_type": JWT_BEARER, "assertion": account.assertion(time.time())}
        started = time.monotonic()
        response = await _request(client, account.token_uri, token_endpoint=True, data=form)
        self.token_fetches += 1
        if not response.is_success:
            raise classify_token(
                response.status_code, response.content, response.headers.get("Retry-After")
            )
        try:
            answer = response.json()
            value = str(answer["access_token"])
            lifetime = float(answer.get("expires_in", 3600))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise PermanentError(
                "OAUTH_BAD_RESPONSE", "token endpoint answered 2xx without an access_token",
                error_class=ErrorClass.ACCOUNT,
            ) from None
        # Count from before the request: the token's clock started when the server minted it.
        self._token = _AccessToken(value=value, expires_at=started + lifetime)
        return value
