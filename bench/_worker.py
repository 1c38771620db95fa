"""`notifier worker` for the bench when the installed Celery rejects the worker's `--quiet`.

Celery 5.7's `worker` subcommand has no `--quiet` (it is an option of the `celery` group), so
`notifier worker` exits at start-up with "No such option '--quiet'" on such an install. Until
notifier/cli.py stops passing it, the bench starts the worker through this shim — the same
`notifier.cli.main(["worker", ...])`, with only that one flag dropped — and says so in its notes.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from celery import Celery

from notifier.cli import main

_original = Celery.worker_main


def _worker_main(self: Celery, argv: Sequence[str] | None = None) -> None:
    _original(self, [a for a in (argv or []) if a != "--quiet"])


Celery.worker_main = _worker_main  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(main())
