"""The API's tokens, read from the environment only (no web framework here: the worker's
sandbox provider and the CLI post to the callbacks with the same token the API checks)."""

from __future__ import annotations

import os

from notifier.errors import ConfigError

# The names of the variables holding the tokens (the tokens are only ever read from them).
API_TOKEN_ENV = "NOTIFIER_API_TOKEN"  # noqa: S105
CALLBACK_TOKEN_ENV = "NOTIFIER_CALLBACK_TOKEN"  # noqa: S105


def token_from_env(name: str) -> str | None:
    """The token in environment variable `name`, or None when it is unset: what it guards is
    then open (loopback demos, `notifier up`).

    Set but blank is refused: that is what a missing secret looks like (`NAME=` left in the
    env file, `NAME=${TOKEN}` with TOKEN unset, `$(cat missing-file)`), and it must not quietly
    open the API. Surrounding whitespace is dropped: a token written from a file often ends in
    a newline, which no client presents (the API strips Bearer values, Alertmanager trims
    its credentials file), so keeping it would lock every sender out."""
    value = os.environ.get(name)
    if value is None:
        return None
    if not value.strip():
        raise ConfigError(f"{name}: set but empty; set the token, or unset {name} to run "
                          f"without authentication")
    return value.strip()


def check_tokens() -> None:
    """ConfigError now for a token the API would refuse to start with, and for an API locked
    by its token whose provider callbacks would stay open: anyone could then post SMS replies
    (confirming drill phases) and delivery receipts (closing a failed SMS as delivered)."""
    api, callback = token_from_env(API_TOKEN_ENV), token_from_env(CALLBACK_TOKEN_ENV)
    if api is not None and callback is None:
        raise ConfigError(f"{CALLBACK_TOKEN_ENV}: unset while {API_TOKEN_ENV} is set, which would "
                          f"leave the provider callbacks (/v1/callbacks/...) open to anyone; set "
                          f"it, and add ?token= to the callback URLs (docs/drills.md)")
