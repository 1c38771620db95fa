"""Log lines are JSON and carry the transaction and delivery IDs."""

from __future__ import annotations

import json
import logging

from notifier.logs import JsonFormatter, log_lines


def test_json_log_line_carries_ids_and_is_parseable() -> None:
    record = logging.LogRecord("notifier.delivery", logging.INFO, __file__, 1,
                               "sms %s -> %s", ("sent", "alice"), None)
    record.transaction_id, record.delivery_id, record.outcome = "tx-1", "tx-1.0", "sent"
    line = json.loads(JsonFormatter().format(record))
    assert line["msg"] == "sms sent -> alice" and line["level"] == "info"
    assert (line["transaction_id"], line["delivery_id"], line["outcome"]) == ("tx-1", "tx-1.0",
                                                                            "sent")
    assert "error_code" not in line  # absent fields are left out, not null


def test_lines_of_one_record_are_each_a_json_line_of_their_own() -> None:
    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(self.format(record))

    handler = Collect()
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("notifier.test.lines")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    log_lines(logger, logging.INFO, [("accepted alert event from api", {"transaction_id": "tx-1"}),
                                     ("accepted 告警 event from api", {"transaction_id": "tx-2"})])
    log_lines(logger, logging.DEBUG, [("below the level", {"transaction_id": "tx-3"})])
    log_lines(logger, logging.INFO, [])  # nothing stored: nothing written
    assert len(seen) == 1  # one record, one write
    lines = [json.loads(line) for line in seen[0].split("\n")]
    assert [(line["msg"], line["transaction_id"]) for line in lines] == [
        ("accepted alert event from api", "tx-1"), ("accepted 告警 event from api", "tx-2")]
    assert all(line["level"] == "info" and line["logger"] == "notifier.test.lines" for line in lines)
    assert "告警" in seen[0]  # UTF-8 as is, not \\u escapes
