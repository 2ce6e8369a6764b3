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


class RetryLog:
    """The log of a loop that retries every round: a failure once, again only when its reason changes, and its recovery.

    A store or token outage fails every round of every background loop in every worker; one
    line a round each, with a traceback, buried everything else in the log. The reason is the
    error's own message (an expected outage); an unexpected exception is still logged in full.
    """

    def __init__(self, logger: logging.Logger, what: str) -> None:
        self._logger = logger
        self._what = what
        self._reason: str | None = None

    def failed(self, reason: str) -> None:
        if reason != self._reason:
            self._logger.error("%s failed (retrying; logged again when the reason changes): %s", self._what, reason)
            self._reason = reason

    def succeeded(self) -> None:
        if self._reason is not None:
            self._logger.info("%s works again", self._what)
            self._reason = None


__all__ = ["JsonFormatter", "RetryLog", "configure"]
