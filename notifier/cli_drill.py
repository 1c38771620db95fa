"""`notifier drill ...` and `notifier sandbox reply ...` subcommands."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from notifier.config import Settings

HANDLERS: dict[str, Callable[[argparse.Namespace, Settings], int]] = {}


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    del sub
