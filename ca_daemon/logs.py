"""Structured logs: one JSON object per line on stderr.

Every record has ts, level, logger and msg; a record logged with `extra={"fields": {...}}`
also carries those fields at the top level (the per-request line: method, caller, status,
latency_ms). Exceptions are one "exc" string. PINs never reach a log call (see config.SecretSource).
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(level: int = logging.INFO) -> None:
    """Install the JSON handler on the root logger once per process."""
    root = logging.getLogger()
    if root.handlers:
        return
    # What the JSON line does not carry is not collected for every record (the logging HOWTO's
    # "Optimization" section): the caller's source location, thread and multiprocessing names.
    # Sign writes one record per request.
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root.addHandler(handler)
    root.setLevel(level)


__all__ = ["JsonFormatter", "configure"]
