"""The canonical encoding of audit events and checkpoints, and their hashes. Pure, no I/O.

Shared by the store (which assigns the chain inside the write transaction) and by
`audit.verify` (which recomputes it offline), so both use exactly one definition.

Event encoding, version 1 (documented in README.md, "Audit log"): the JSON object

    {"action", "actor", "details", "device_id", "key_id", "outcome", "prev",
     "reason", "request_digest", "seq", "serial", "time", "v": 1}

with keys sorted, no insignificant whitespace (separators "," and ":"), ASCII only
(every other character as a \\uXXXX escape), where `time` is UTC as
"YYYY-MM-DDTHH:MM:SS.ffffffZ", `serial` is lowercase hex or null, `request_digest`
and `prev` are lowercase hex, and `details` is the stored JSON text of the details
object (keys sorted, Python's default separators). The event hash is
SHA-256("ca-daemon/audit-event/v1" || 0x00 || encoding); `prev` of the first event is
64 zeros. A checkpoint is the same kind of JSON over {"count", "head", "key_id", "seq",
"time", "v": 1}, signed as "ca-daemon/audit-checkpoint/v1" || 0x00 || encoding.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any

GENESIS = b"\x00" * 32
EVENT_DOMAIN = b"ca-daemon/audit-event/v1\x00"
CHECKPOINT_DOMAIN = b"ca-daemon/audit-checkpoint/v1\x00"
# The PostgreSQL advisory lock that serialises chain appends across replicas and workers.
CHAIN_LOCK_KEY = 0x0CA0A0D17


def canonical_time(value: datetime) -> str:
    """UTC with microseconds; a naive value (SQLite returns those) is taken as UTC.

    The text is strftime("%Y-%m-%dT%H:%M:%S.%fZ")'s. isoformat gives the same for years from 1000 at a
    quarter of the cost (it runs two or three times an event in `audit verify`); before that
    strftime's %Y is not padded to four digits, and strftime it stays.
    """
    aware = value if value.tzinfo else value.replace(tzinfo=UTC)
    utc = aware.astimezone(UTC)
    if utc.year >= 1000:
        return utc.isoformat(timespec="microseconds")[:-6] + "Z"  # without its "+00:00"
    return utc.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def details_text(details: dict[str, Any]) -> str:
    """The stored form of an event's details (and the form that is hashed)."""
    return json.dumps(details, sort_keys=True)


# json.dumps with these arguments builds an encoder on every call (about 2 us of an event's hash); the same one, kept.
_CANONICAL_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _dumps(obj: dict[str, Any]) -> bytes:
    return _CANONICAL_JSON.encode(obj).encode("ascii")


def event_encoding(fields: dict[str, Any], seq: int, prev: bytes) -> bytes:
    """The canonical bytes of one event; fields holds the stored column values."""
    serial = fields.get("serial")
    return _dumps(
        {
            "v": 1,
            "seq": int(seq),
            "time": canonical_time(fields["time"]),
            "actor": fields["actor"],
            "action": fields["action"],
            "outcome": fields["outcome"],
            "serial": serial if serial else None,
            "device_id": fields.get("device_id") or "",
            "key_id": fields.get("key_id") or "",
            "request_digest": bytes(fields.get("request_digest") or b"").hex(),
            "reason": fields.get("reason") or "",
            "details": fields.get("details") or "{}",
            "prev": prev.hex(),
        }
    )


def event_hash(fields: dict[str, Any], seq: int, prev: bytes) -> bytes:
    return hashlib.sha256(EVENT_DOMAIN + event_encoding(fields, seq, prev)).digest()


def checkpoint_message(*, seq: int, count: int, head: bytes, time: datetime, key_id: str) -> bytes:
    """The bytes an audit checkpoint signature covers."""
    body = {"v": 1, "seq": int(seq), "count": int(count), "head": head.hex(), "time": canonical_time(time), "key_id": key_id}
    return CHECKPOINT_DOMAIN + _dumps(body)


__all__ = ["CHAIN_LOCK_KEY", "GENESIS", "canonical_time", "checkpoint_message", "details_text", "event_encoding", "event_hash"]
