"""JSON log lines carrying the transaction and delivery IDs; secrets are never logged."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence

import orjson

_FIELDS = ("transaction_id", "delivery_id", "channel", "provider", "outcome", "error_code")
Line = tuple[str, Mapping[str, object]]  # a message and its fields (of _FIELDS)


def log_lines(logger: logging.Logger, level: int, lines: Sequence[Line]) -> None:
    """Several log lines as one record: one pass through the handlers and one write for all of
    them (the API logs one line per accepted event; a record each cost ≈ 10 % of the API's time
    per webhook). Each line is a line of its own with its own fields, as if logged alone."""
    if lines and logger.isEnabledFor(level):
        logger.log(level, "%s", lines[0][0], extra={"lines": lines})


class JsonFormatter(logging.Formatter):
    _second = -1
    _stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:  # a line per accepted event: format each second once
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        head: dict[str, object] = {
            "ts": f"{self._stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        lines: Sequence[Line] | None = getattr(record, "lines", None)
        if lines is not None:
            return "\n".join([_dump({**head, "msg": msg, **fields}) for msg, fields in lines])
        entry = {**head, "msg": record.getMessage()}
        for name in _FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return _dump(entry)


def _dump(entry: Mapping[str, object]) -> str:
    # orjson writes non-ASCII as UTF-8 (json.dumps' ensure_ascii=False) at a fifth of the cost;
    # anything it cannot encode (a field holding an object) is logged as its str().
    return orjson.dumps(entry, default=str).decode()


def configure_logging(level: str = "INFO") -> None:
    # Nothing here prints the calling frame, thread or process of a record: skip collecting
    # them (the logging HOWTO's "Optimization"), a few microseconds per line of which the API
    # writes one per accepted event.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.captureWarnings(True)  # warnings.warn() output as JSON lines too (logger py.warnings)
    # Request lines of our own HTTP clients are noise, and may carry URLs with tokens. Celery's
    # two INFO lines per task ("received", "succeeded in") say less than our own line per
    # delivery step, which carries the transaction, and cost the worker a write each; a task
    # that fails is still logged (ERROR).
    for chatty in ("httpx", "httpcore", "celery.worker.strategy", "celery.app.trace"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
