"""Structured logs: one JSON object per line on stderr.

Every record has ts, level, logger and msg; a record logged with `extra={"fields": {...}}`
also carries those fields at the top level (the per-request line: method, caller, status,
latency_ms). Exceptions are one "exc" string. PINs never reach a log call (see config.SecretSource).
"""

from __future__ import annotations

import json
import logging
import sys
import time
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


class LogThrottle:
    """At most one log line per kind per interval, counting the ones it holds back in between."""

    def __init__(self, interval: float) -> None:
        self._interval = interval
        # kind -> (lines held back since its last line, when that line was written)
        self._kinds: dict[str, tuple[int, float]] = {}

    def admit(self, kind: str) -> int | None:
        """None: hold this line back (it is counted); else write it now, with how many were held back before it."""
        held_back, last = self._kinds.get(kind, (0, -self._interval))
        now = time.monotonic()
        if now - last < self._interval:
            self._kinds[kind] = (held_back + 1, last)
            return None
        self._kinds[kind] = (0, now)
        return held_back


__all__ = ["JsonFormatter", "LogThrottle", "RetryLog", "configure"]
