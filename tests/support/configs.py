"""Config files for tests that start notifier's own processes or CLI."""

from __future__ import annotations

from pathlib import Path

import yaml


def sandbox_email_config(directory: Path, redis_url: str) -> Path:
    """notifier.yaml in `directory`: one person, reached by sandbox email on every route."""
    path = directory / "notifier.yaml"
    path.write_text(yaml.safe_dump({
        "redis_url": redis_url,
        "channels": {"email": {"provider": "sandbox"}},
        "recipients": {"alice": {"email": "alice@example.com"}},
        "routes": [{"match": {}, "to": ["alice"], "channels": ["email"]}],
    }), encoding="utf-8")
    return path
