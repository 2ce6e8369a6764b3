"""What `audit verify` keeps while it reads a log: one 32-byte hash per event, not a dict entry.

Checkpoints may stand anywhere in an export, so every event's chain hash is held until the
last event is read. With a dict of bytes that was about 190 bytes an event (408 MB peak for
`audit verify --live` over 2.1 million events, measured by the scale review).
"""

from __future__ import annotations

import hashlib
import io
import tracemalloc
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ca_daemon.audit import _ChainHashes, read_export, verify
from ca_daemon.audit_format import checkpoint_record, event_record
from ca_daemon.audit_hash import GENESIS, checkpoint_message, event_hash


def _hash(seq: int) -> bytes:
    return hashlib.sha256(seq.to_bytes(8, "big")).digest()


def test_a_log_in_order_costs_32_bytes_an_event() -> None:
    events = 200_000
    hashes = [_hash(seq) for seq in range(1, events + 1)]  # made before measuring: the records' own memory
    tracemalloc.start()
    try:
        held = _ChainHashes()
        for seq, chain_hash in enumerate(hashes, 1):
            held.add(seq, chain_hash)
        used = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert used < 40 * events, f"{used / events:.0f} bytes an event"
    assert held[1] == hashes[0] and held[events] == hashes[-1] and events in held and events + 1 not in held


def test_a_tampered_order_keeps_the_first_hash_of_each_seq() -> None:
    held = _ChainHashes()
    for seq in (1, 2, 3):
        held.add(seq, _hash(seq))
    held.add(2, _hash(99))  # a duplicate seq (an inserted event): the first one read counts
    held.add(6, _hash(6))  # a gap (deleted events 4 and 5), then the log goes on
    held.add(4, _hash(4))  # reordered
    held.add(6, _hash(98))
    assert [held[seq] for seq in (1, 2, 3, 4, 6)] == [_hash(1), _hash(2), _hash(3), _hash(4), _hash(6)]
    assert 5 not in held and 0 not in held and held.lowest(default=7) == 1
    only_late = _ChainHashes()
    only_late.add(40, _hash(40))  # an export cut at its start
    assert only_late.lowest(default=1) == 40 and 40 in only_late


def test_a_signed_checkpoint_costs_48_bytes_until_the_chain_is_compared() -> None:
    """Each valid checkpoint's record (about 1.1 KB as a parsed dict) was held to the end: 118 MB for 100,000 of them."""
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    events, now = 5_000, datetime(2026, 1, 1, tzinfo=UTC)
    rows, heads, prev = [], [], GENESIS
    for seq in range(1, events + 1):
        row: dict[str, Any] = {"seq": seq, "time": now, "actor": "a", "action": "x", "outcome": "o", "serial": None}
        row |= {"device_id": "", "key_id": "", "request_digest": b"", "reason": "", "details": "{}", "prev_hash": prev}
        prev = event_hash(row, seq, prev)
        rows.append({**row, "hash": prev})
        message = checkpoint_message(seq=seq, count=seq, head=prev, time=now, key_id="audit")
        heads.append(key.sign(message, ec.ECDSA(hashes.SHA256())))

    def records() -> Iterator[dict[str, Any]]:  # made as they are read, as read_export does
        for row, signature in zip(rows, heads, strict=True):
            yield event_record(row)
            yield checkpoint_record(seq=row["seq"], count=row["seq"], head_hash=row["hash"], time=now, key_id="audit", signature=signature)

    tracemalloc.start()
    try:
        report = verify(records(), public)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert report.ok and report.checkpoints == events, report.summary()
    assert peak < 200 * events, f"{peak / events:.0f} bytes an event and its checkpoint"


def test_a_line_longer_than_any_export_writes_is_skipped_without_being_held() -> None:
    """A hostile file's one long line was read whole (a 200 MB line: 466 MB for `audit verify`), whatever its size."""
    longest = 16 * 1024 * 1024  # audit.MAX_EXPORT_LINE
    long = "x" * (3 * longest)
    source = io.StringIO('{"type": "header"}\n{"type": "event", "actor": "' + long + '"}\n{"type": "end"}\n')
    del long
    tracemalloc.start()
    try:
        records = list(read_export(source))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [r["type"] for r in records] == ["header", "unparseable", "end"]
    assert records[1]["line"] == 2 and records[1]["why"].startswith(f"longer than {longest} characters"), records[1]
    assert peak < 1.5 * longest, f"{peak / longest:.1f} times the longest line an export writes"
