"""Log lines are JSON and carry the transaction and delivery IDs."""

from __future__ import annotations

import json
import logging

from notifier.logs import JsonFormatter


def test_json_log_line_carries_ids_and_is_parseable() -> None:
    record = logging.LogRecord("notifier.delivery", logging.INFO, __file__, 1,
                               "sms %s -> %s", ("sent", "alice"), None)
    record.transaction_id, record.delivery_id, record.outcome = "tx-1", "tx-1.0", "sent"
    line = json.loads(JsonFormatter().format(record))
    assert line["msg"] == "sms sent -> alice" and line["level"] == "info"
    assert (line["transaction_id"], line["delivery_id"], line["outcome"]) == ("tx-1", "tx-1.0",
                                                                            "sent")
    assert "error_code" not in line  # absent fields are left out, not null
