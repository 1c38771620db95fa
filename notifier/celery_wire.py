"""Celery task messages as kombu's Redis transport stores them, built without a broker round trip.

The API writes the dispatch message of an accepted event inside the same Lua script that stores
the event, so "stored" and "queued" are one atomic step and one round trip. The bytes must be
exactly what `Celery.send_task(name, args=..., queue=...)` LPUSHes on Redis (task protocol 2,
JSON, body base64 as kombu's virtual transport encodes it); tests/integration/test_celery_wire.py
compares the two, and every integration test has real workers consume these messages.
"""

from __future__ import annotations

import base64
import json
import os
import socket
from collections.abc import Sequence

import orjson

from notifier.ids import random16

_MARK = "\x00{}\x00"
# Celery protocol 2 body: (args, kwargs, embed); what send_task serialises for a plain call.
_BODY = '[[%s], {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]'


class TaskMessages:
    """Builds the Redis list entry for one task; the JSON is pre-rendered once per task name."""

    def __init__(self, task: str, queue: str) -> None:
        self.task = task
        self.queue = queue  # kombu's anonymous exchange: the routing key is the list's key
        origin = f"gen{os.getpid()}@{socket.gethostname()}"
        template = json.dumps({
            "body": _MARK.format("body"),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {
                "lang": "py", "task": task, "id": _MARK.format("id"), "shadow": None,
                "eta": None, "expires": None, "group": None, "group_index": None, "retries": 0,
                "timelimit": [None, None], "root_id": _MARK.format("id"), "parent_id": None,
                "argsrepr": _MARK.format("argsrepr"), "kwargsrepr": "{}", "origin": origin,
                # What send_task sends on celery 5.6 (5.7 sends None; pyproject keeps it < 5.7).
                # Either way the task's own ignore_result (celeryconfig: True) decides.
                "ignore_result": False, "replaced_task_nesting": 0, "stamped_headers": None,
                "stamps": {},
            },
            "properties": {
                "correlation_id": _MARK.format("id"), "delivery_mode": 2,
                "delivery_info": {"exchange": "", "routing_key": queue}, "priority": 0,
                "body_encoding": "base64", "delivery_tag": _MARK.format("tag"),
            },
        })
        # json.dumps escapes the NUL marks as \u0000: turn each marked slot into a %-format
        # field once, so a message is one format operation.
        parts = template.replace("%", "%%").split('"\\u0000')
        fields = [part.split('\\u0000"', 1) for part in parts[1:]]
        self._format = parts[0] + "".join(
            (f"%({name})s" if name == "argsrepr" else f'"%({name})s"') + rest for name, rest in fields)

    def message(self, args: Sequence[str]) -> tuple[str, str]:
        """(task id, the JSON text to LPUSH onto `self.queue`)."""
        task_id = _uuid4()
        body = _BODY % ", ".join([orjson.dumps(arg).decode() for arg in args])
        return task_id, self._format % {
            "body": base64.b64encode(body.encode()).decode(),
            "id": task_id,
            "argsrepr": orjson.dumps(repr(list(args))).decode(),
            "tag": task_id,  # unique per message is all kombu needs of it
        }


def _uuid4() -> str:
    """A random (version 4) UUID string; uuid.uuid4() costs 8x this on the ingest hot path."""
    raw = bytearray(random16())
    raw[6] = (raw[6] & 0x0F) | 0x40
    raw[8] = (raw[8] & 0x3F) | 0x80
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
