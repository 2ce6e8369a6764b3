"""The per-request log line, written in batches (service.RequestLog)."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from ca_daemon.service import RequestLog

SIGN = "/ca_daemon.v1.CertificateAuthority/Sign"


def _lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "ca_daemon.rpc"]


def test_lines_are_written_within_the_flush_interval_stamped_with_the_end_of_their_request(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ca_daemon.rpc")
    request_log = RequestLog()

    async def serve() -> tuple[float, int]:
        ended = time.time()
        request_log.add(SIGN, "station-01", "OK", 0.0123)
        request_log.add(SIGN, "station-02", "INVALID_ARGUMENT", 0.002, "csr is empty")
        written_at_once = len(_lines(caplog))
        await asyncio.sleep(RequestLog.FLUSH_S * 5)
        return ended, written_at_once

    ended, written_at_once = asyncio.run(serve())
    assert written_at_once == 0
    first, second = _lines(caplog)
    assert first.fields == {"method": SIGN, "caller": "station-01", "status": "OK", "latency_ms": 12.3}  # type: ignore[attr-defined]
    assert second.fields["error"] == "csr is empty" and second.fields["status"] == "INVALID_ARGUMENT"  # type: ignore[attr-defined]
    assert first.getMessage() == f"rpc {SIGN} OK"
    assert abs(first.created - ended) < RequestLog.FLUSH_S  # the request's end, not the time of writing


def test_flush_writes_what_is_pending_at_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ca_daemon.rpc")
    request_log = RequestLog()

    async def stop() -> int:
        request_log.add(SIGN, "station-01", "OK", 0.01)
        request_log.flush()  # as Worker.stop does
        return len(_lines(caplog))

    assert asyncio.run(stop()) == 1
    request_log.flush()
    assert len(_lines(caplog)) == 1  # nothing twice
