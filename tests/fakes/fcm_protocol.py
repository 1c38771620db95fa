"""What FCM HTTP v1 and Google's OAuth token endpoint say and check, for the fake FCM:
JWT-bearer assertion checks, service-account key files, google.rpc.Status error bodies and
message validation.

Shapes as FCM sends them (docs "FCM error codes"; bloomberg/pushiko's recorded responses):
``{"error": {"code": 404, "message": "...", "status": "NOT_FOUND", "details":
[{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": "UNREGISTERED"}]}}``
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
CLOCK_SKEW = 60

FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"

RPC_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ABORTED",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}

MESSAGE_FIELDS = {
    "name", "data", "notification", "android", "webpush", "apns", "fcm_options",
    "token", "topic", "condition",
}
MAX_PAYLOAD_BYTES = 4096  # notification + data, as FCM counts it for most messages


def error_body(status: int, error_code: str | None = None, message: str = "") -> dict[str, Any]:
    error: dict[str, Any] = {
        "code": status,
        "message": message or "scripted fault",
        "status": RPC_STATUS.get(status, "UNKNOWN"),
    }
    if error_code:
        error["details"] = [{"@type": FCM_ERROR_TYPE, "errorCode": error_code}]
    return {"error": error}


def validate_message(body: Any) -> str:
    """The first reason FCM would answer 400 INVALID_ARGUMENT, or "" when the body is fine."""
    if not isinstance(body, dict) or not isinstance(body.get("message"), dict):
        return "Invalid JSON payload received. Expected an object with field 'message'."
    message = body["message"]
    unknown = sorted(set(message) - MESSAGE_FIELDS)
    if unknown:
        return f'Invalid JSON payload received. Unknown name "{unknown[0]}" at \'message\'.'
    targets = [k for k in ("token", "topic", "condition") if k in message]
    if len(targets) != 1:
        return "Exactly one of token, topic or condition must be set."
    if not isinstance(message.get("token", ""), str) or message.get("token") == "":
        return "The registration token is not a valid FCM registration token"
    notification = message.get("notification", {})
    if not isinstance(notification, dict) or any(
        not isinstance(v, str) for v in notification.values()
    ):
        return "Invalid value at 'message.notification' (TYPE_STRING)"
    data = message.get("data", {})
    if not isinstance(data, dict):
        return "Invalid value at 'message.data' (type.googleapis.com/google.protobuf.Struct)"
    for key, value in data.items():
        if not isinstance(value, str):
            return f"Invalid value at 'message.data[{key}].value' (TYPE_STRING)"
        if key in ("from", "message_type") or key.startswith(("google", "gcm")):
            return f"Invalid data key: {key!r} is reserved"
    payload = json.dumps({"notification": notification, "data": data}, ensure_ascii=False)
    if len(payload.encode()) > MAX_PAYLOAD_BYTES:
        return "Message is too big"
    android = message.get("android", {})
    if android.get("priority", "normal") not in ("normal", "high", "NORMAL", "HIGH"):
        return "Invalid value at 'message.android.priority'"
    return ""


@lru_cache(maxsize=1)
def default_key() -> rsa.RSAPrivateKey:
    """One throwaway key per process: RSA generation costs tens of milliseconds."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def write_service_account(
    path: str | Path, token_uri: str, *, project_id: str = "demo",
    key: rsa.RSAPrivateKey | None = None, client_email: str | None = None,
) -> dict[str, str]:
    """Write a service-account key file like the Firebase console's; return its contents."""
    key = key or default_key()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    info = {
        "type": "service_account",
        "project_id": project_id,
        "private_key_id": uuid.uuid4().hex,
        "private_key": pem,
        "client_email": client_email or f"notifier@{project_id}.iam.gserviceaccount.com",
        "client_id": "100000000000000000001",
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri,
    }
    target = Path(path)
    target.write_text(json.dumps(info, indent=2), encoding="utf-8")
    target.chmod(0o600)
    return info


def _b64decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def check_assertion(
    assertion: str, public_key: rsa.RSAPublicKey, token_uri: str, client_email: str
) -> str:
    """Why Google's token endpoint would refuse this JWT-bearer assertion, or "" if it is fine."""
    parts = assertion.split(".")
    if len(parts) != 3:
        return "Invalid JWT: not three segments"
    try:
        header = json.loads(_b64decode(parts[0]))
        claims = json.loads(_b64decode(parts[1]))
        signature = _b64decode(parts[2])
    except ValueError:
        return "Invalid JWT: bad base64 or JSON"
    if header.get("alg") != "RS256":
        return "Invalid JWT: alg must be RS256"
    try:
        public_key.verify(
            signature, f"{parts[0]}.{parts[1]}".encode(), padding.PKCS1v15(), hashes.SHA256()
        )
    except InvalidSignature:
        return "Invalid JWT Signature."
    now = time.time()
    lifetime = "Invalid JWT: Token must be a short-lived token and in a reasonable timeframe"
    exp, iat = claims.get("exp"), claims.get("iat")
    checks = [
        (claims.get("aud") == token_uri, "Invalid JWT: aud"),
        (claims.get("iss") == client_email, "Invalid JWT: iss"),
        (SCOPE in str(claims.get("scope", "")).split(), "Invalid JWT: scope"),
        (isinstance(exp, int) and exp > now - CLOCK_SKEW, lifetime),
        (isinstance(iat, int) and isinstance(exp, int) and iat <= now + CLOCK_SKEW
         and exp - iat <= 3600, lifetime),
    ]
    return next((message for ok, message in checks if not ok), "")
