"""The audit log's JSON Lines export: a header, the events in order, each checkpoint after the event it covers, an end record.

Two writers share it, so that `ca-daemon audit verify` checks either file the same way:
`ca-daemon audit export` reads the database (audit.py), `ca-daemon client audit-export`
rebuilds the same records from StreamAuditEvents and ListAuditCheckpoints (client.py),
for an auditor who has no access to the database. Pure data: no store, no token.

The end record (version 2) counts what the writer wrote and names its last event, so a
copy that lost its last lines (a cut at a line boundary, a partial transfer, an empty
file) fails verification instead of passing as a shorter log.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime
from typing import Any, TextIO

from ca_daemon.audit_hash import canonical_time

EXPORT_FORMAT = "ca-daemon-audit-export"
# 2: the file ends with {"type": "end", ...}. Version 1 files have no end record, so a cut copy
# of one cannot be told from a whole one; verify refuses them and says to export again.
EXPORT_VERSION = 2


def event_record(row: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON form of one event, from its stored columns (None and "" are both absent text)."""
    return {
        "type": "event",
        "seq": int(row["seq"]),
        "time": canonical_time(row["time"]),
        "actor": row["actor"],
        "action": row["action"],
        "outcome": row["outcome"],
        "serial": row["serial"],
        "device_id": row["device_id"] or "",
        "key_id": row["key_id"] or "",
        "request_digest": bytes(row["request_digest"] or b"").hex(),
        "reason": row["reason"] or "",
        "details": row["details"] or "{}",
        "prev_hash": bytes(row["prev_hash"]).hex() if row["prev_hash"] is not None else None,
        "hash": bytes(row["hash"]).hex() if row["hash"] is not None else None,
    }


def checkpoint_record(*, seq: int, count: int, head_hash: bytes, time: datetime, key_id: str, signature: bytes) -> dict[str, Any]:
    """The JSON form of one signed checkpoint."""
    return {
        "type": "checkpoint",
        "seq": seq,
        "count": count,
        "head": head_hash.hex(),
        "time": canonical_time(time),
        "key_id": key_id,
        "signature": base64.b64encode(signature).decode(),
    }


def interleave(events: Iterable[dict[str, Any]], checkpoints: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Event records with each checkpoint record right after the event it covers (both ordered by seq).

    Checkpoints beyond the last event come at the end: the verifier reports that truncation
    instead of the writer hiding it. Both are consumed as they go (a checkpoint without a seq
    at once), so neither needs to be held.
    """
    pending = iter(checkpoints)
    following = next(pending, None)
    for record in events:
        yield record
        while following is not None and (following.get("seq") or 0) <= record["seq"]:
            yield following
            following = next(pending, None)
    if following is not None:
        yield following
        yield from pending


def end_record(*, events: int, checkpoints: int, last_seq: int, last_hash: str | None) -> dict[str, Any]:
    """The export's last line: what the writer wrote, for verify to compare with what the file holds."""
    return {"type": "end", "events": events, "checkpoints": checkpoints, "last_seq": last_seq, "last_hash": last_hash}


def write_export(out: TextIO, records: Iterable[dict[str, Any]]) -> tuple[int, int]:
    """Write the header, the records (as `interleave` orders them) and the end record; (events, checkpoints) written.

    The end record is written only once every record is: an export that fails half-way
    leaves a file without it, which verify refuses.
    """
    header = {"type": "header", "format": EXPORT_FORMAT, "version": EXPORT_VERSION, "exported_at": canonical_time(datetime.now(UTC))}
    out.write(json.dumps(header) + "\n")
    written = {"event": 0, "checkpoint": 0}
    last_seq, last_hash = 0, None
    for record in records:
        out.write(json.dumps(record, sort_keys=True) + "\n")
        written[record["type"]] += 1
        if record["type"] == "event":
            last_seq, last_hash = record["seq"], record["hash"]
    end = end_record(events=written["event"], checkpoints=written["checkpoint"], last_seq=last_seq, last_hash=last_hash)
    out.write(json.dumps(end, sort_keys=True) + "\n")
    return written["event"], written["checkpoint"]


__all__ = ["EXPORT_FORMAT", "EXPORT_VERSION", "checkpoint_record", "end_record", "event_record", "interleave", "write_export"]
