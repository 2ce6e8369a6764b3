"""The tamper-evident audit log: appends, signed checkpoints, JSON Lines export and verify().

Events are chained by the store inside each writer's transaction (see
`SqlStore._insert_audit` and `audit_hash` for the canonical encoding). This module adds
what sits above the store:

- `AuditLog`: group-committed appends for events that have no other transaction to ride
  in (role denials, configuration reloads, refused requests: `refusal_event`);
- `Checkpointer`: signs (seq, count, head hash) with the audit key in the HSM, at an
  interval and at shutdown, and stores the checkpoint;
- `export` / `verify`: a JSON Lines file an auditor can check offline with only the audit
  public key (PEM). verify() names the first bad event and the kind of damage.
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import re
import struct
from array import array
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NoReturn, TextIO, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from ca_daemon import crl_der
from ca_daemon.audit_format import EXPORT_FORMAT, EXPORT_VERSION, checkpoint_record, event_record, interleave, write_export
from ca_daemon.audit_hash import GENESIS, checkpoint_message, event_hash
from ca_daemon.errors import CaError, FailedPrecondition, HsmUnavailable, InvalidRequest, LintFailure, NotFound, StoreUnavailable, capped
from ca_daemon.hsm import Hsm, HsmPrivateKey, Pkcs11Uri
from ca_daemon.model import AuditEvent, KeySpec, RevocationReason
from ca_daemon.policy import parse_serial
from ca_daemon.store import SqlStore, serial_hex
from ca_daemon.store.audit_store import MAX_PAGE, AuditStore, ChainHead, Checkpoint, EventFilter, RecordsAndEvents, RevocationInForce
from ca_daemon.store.group_commit import GroupCommitter

log = logging.getLogger(__name__)
_Row = TypeVar("_Row")

EVENT_FIELDS = ("seq", "time", "actor", "action", "outcome", "serial", "device_id", "key_id", "request_digest", "reason", "details")


class AuditLog:
    """Appends events that are not part of another transaction, group-committed on one thread.

    name is the thread's: each worker has one for access denials ("audit-events") and one for
    refused requests ("audit-refusals", Authority.refusals), so a flood of bad requests is
    committed in batches without holding up the other.
    """

    def __init__(self, store: SqlStore, batch_max: int = 256, *, name: str = "audit-events") -> None:
        self._committer: GroupCommitter[AuditEvent, None] = GroupCommitter(_append(store), batch_max, name=name)

    async def record(self, event: AuditEvent) -> None:
        """Append durably; a store failure is logged (the caller's answer does not depend on it)."""
        try:
            await self._committer.submit(event)
        except CaError as exc:
            log.error("could not append %s (%s, actor %r) to the audit log: %s", event.action, event.outcome, event.actor, exc.message)

    def close(self) -> None:
        self._committer.close()


# What a use case is given to record its refusals with: AuditLog.record of the worker's refusal log.
EventRecorder = Callable[[AuditEvent], Awaitable[None]]

# How much of a refused request's untrusted text an event keeps (actor, device ID; the message is cut at 512).
_REFUSED_ID_CHARS = 256
_REFUSED_MESSAGE_CHARS = 512


def refusal_event(
    action: str,
    actor: str,
    refusal: CaError,
    *,
    serial: int | None = None,
    device_id: str = "",
    request_digest: bytes = b"",
    details: dict[str, str] | None = None,
) -> AuditEvent:
    """The event of a request a use case refused: the action it asked for, outcome "refused", the rule as reason.

    One shape for every use case (Sign, Revoke, Unrevoke, RevokeBulk, IssueVerificationCertificate, the key ceremony),
    so an auditor finds a refusal by the action and object it would have changed. The object is
    what the request named, where it parsed (a serial only as a number); the caller's text is
    bounded, so a flood of huge requests cannot bloat the log. A certificate that failed the
    pre-issuance lint is a CA defect, not the caller's: outcome "lint-failed".
    """
    return AuditEvent(
        time=datetime.now(UTC),
        actor=actor[:_REFUSED_ID_CHARS],
        action=action,
        outcome="lint-failed" if isinstance(refusal, LintFailure) else "refused",
        serial=serial,
        device_id=device_id[:_REFUSED_ID_CHARS],
        request_digest=request_digest,
        reason=refusal.rule or type(refusal).__name__,
        details={**(details or {}), "field": refusal.field, "message": refusal.message[:_REFUSED_MESSAGE_CHARS]},
    )


def is_refusal(error: CaError) -> bool:
    """Whether the request was judged and refused; not when the token or the database could not be reached.

    Those are failures a retry may get past, and the database that would record them is often the one missing.
    """
    return not isinstance(error, HsmUnavailable | StoreUnavailable)


def _append(store: SqlStore) -> Callable[[Sequence[AuditEvent]], list[None]]:
    def commit(events: Sequence[AuditEvent]) -> list[None]:
        store.append_audit(events)
        return [None] * len(events)

    return commit


# ---------------------------------------------------------------------------
# The audit key and checkpoints
# ---------------------------------------------------------------------------


def audit_key_id(uri: str) -> str:
    parsed = Pkcs11Uri.parse(uri)
    return parsed.label or parsed.key_id.hex()


def ensure_audit_key(hsm: Hsm, store: SqlStore, uri: str, actor: str) -> bool:
    """Create the EC P-256 audit key in the token unless it exists; True if created (a key event)."""
    parsed = Pkcs11Uri.parse(uri)
    with contextlib.suppress(CaError):
        hsm.public_key_der(parsed)
        return False
    if not parsed.label:
        raise FailedPrecondition(f"audit key {uri} does not exist; name it by label (object=...) so `ca-daemon init` can create it")
    generated = hsm.generate_key(KeySpec.EC_P256, parsed.label)
    store.append_audit(
        [
            AuditEvent(
                time=datetime.now(UTC),
                actor=actor,
                action="key.generate",
                outcome="generated",
                key_id=parsed.label,
                details={"purpose": "audit-checkpoints", "spec": KeySpec.EC_P256.value, "uri": str(generated.uri)},
            )
        ]
    )
    return True


def audit_public_key_pem(hsm: Hsm, uri: str) -> bytes:
    public = serialization.load_der_public_key(hsm.public_key_der(Pkcs11Uri.parse(uri)))
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclass(frozen=True)
class _Vouched:
    """A head a Checkpointer vouches for: the chain must still hold it before anything later is signed."""

    seq: int
    head: bytes
    how: str  # "signed by this process", "checked by this process", "signed in the store when this process started"


class Checkpointer:
    """Signs the chain head with the audit key; skips when the last checkpoint in the store already covers it.

    The store is asked each time, not this process's memory: the daemon's workers (and
    replicas) share one log, and a head another one signed needs no second signature.

    It refuses to sign a chain rewritten behind its back: it remembers the last head it
    signed or checked (at start, the last checkpoint in the store), and signs a newer head
    only if the chain still holds that head at its seq and every event since links to it,
    hashes recomputed. Otherwise checkpoint() raises FailedPrecondition naming the seq, and
    keeps doing so until the chain holds again. A restart forgets what this process signed:
    a chain rewritten while the daemon was stopped, with the checkpoints covering it deleted,
    is caught only by an auditor's earlier export or checkpoint (README, "Audit log").
    """

    def __init__(self, hsm: Hsm, store: SqlStore, key_uri: str) -> None:
        self._store = store
        self._audit = AuditStore(store)
        self._key_id = audit_key_id(key_uri)
        try:
            self._key: HsmPrivateKey = hsm.private_key(Pkcs11Uri.parse(key_uri))
        except NotFound as exc:
            raise FailedPrecondition(f"audit key {key_uri} is not usable ({exc.message}); run `ca-daemon init` to create it") from None
        except CaError as exc:  # the token failed (gone, busy): init would not help, and would make a second audit key
            raise type(exc)(f"audit key {key_uri} could not be read: {exc.message}", rule=exc.rule) from None
        assert isinstance(self._key, ec.EllipticCurvePrivateKey)
        self._public = self._key.public_key()
        stored = self._audit.last_checkpoint()
        self._vouched = _Vouched(stored.seq, stored.head_hash, "signed in the store when this process started") if stored else None

    def checkpoint(self) -> Checkpoint | None:
        """Blocking (store and token): sign and store a checkpoint of the current head; None if one already covers it.

        FailedPrecondition, and nothing signed, if the chain no longer holds the head this
        process vouches for or the events since do not link to it. First, if this process's
        store finds the last event it wrote gone, an audit.gap event records that
        (SqlStore.record_audit_gap), and is signed with the rest.
        """
        self._store.record_audit_gap()
        head = self._audit.head()
        if head is None:
            return None
        last = self._audit.last_checkpoint()
        if last is not None and head.seq <= last.seq:
            return None
        self._adopt(last)
        self._check_chain(head)
        self._vouched = _Vouched(head.seq, head.hash, "checked by this process")
        now = datetime.now(UTC)
        message = checkpoint_message(seq=head.seq, count=head.count, head=head.hash, time=now, key_id=self._key_id)
        assert isinstance(self._key, ec.EllipticCurvePrivateKey)
        signature = self._key.sign(message, ec.ECDSA(hashes.SHA256()))
        checkpoint = Checkpoint(head.seq, head.count, head.hash, now, self._key_id, signature)
        if not self._audit.add_checkpoint(checkpoint):
            return None  # another worker signed this head a moment ago
        self._vouched = _Vouched(head.seq, head.hash, "signed by this process")
        log.info("audit checkpoint: %d events, head %s at seq %d", head.count, head.hash.hex()[:16], head.seq)
        return checkpoint

    def _adopt(self, stored: Checkpoint | None) -> None:
        """Vouch for a newer checkpoint another worker signed, if its signature verifies and the chain holds its head.

        The audit key signs only after the signer's own check, and the hash chain ties every
        earlier event to that head, so the events between it and what this process vouched for
        need no recomputing: a worker that never signs (only the primary does, until shutdown)
        would otherwise re-hash everything since it started when it stops.
        """
        vouched = self._vouched
        if stored is None or (vouched is not None and stored.seq <= vouched.seq):
            return
        message = checkpoint_message(seq=stored.seq, count=stored.count, head=stored.head_hash, time=stored.time, key_id=stored.key_id)
        try:
            self._public.verify(stored.signature, message, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            return
        if self._hash_at(stored.seq) == stored.head_hash:
            self._vouched = _Vouched(stored.seq, stored.head_hash, "signed by the audit key, found in the store")

    def _hash_at(self, seq: int) -> bytes | None:
        """The stored hash of the event at seq; None if there is no such event (or it has no hash)."""
        rows = self._audit.events(EventFilter(after_seq=seq - 1), 1)
        if not rows or int(rows[0]["seq"]) != seq or rows[0]["hash"] is None:
            return None
        return bytes(rows[0]["hash"])

    def _check_chain(self, head: ChainHead) -> None:
        """Raise unless the chain holds the vouched-for head at its seq and the events up to head link to it."""
        vouched = self._vouched
        if vouched is None:
            return
        found = self._hash_at(vouched.seq)
        if found != vouched.head:
            now = "no hashed event" if found is None else f"head {found.hex()[:16]}..."
            self._refuse(vouched, f"the log has {now} at seq {vouched.seq}")
        prev, after = vouched.head, vouched.seq
        while after < head.seq:
            rows = self._audit.events(EventFilter(after_seq=after), MAX_PAGE)
            if not rows:
                self._refuse(vouched, f"event(s) {after + 1}..{head.seq} are missing")
            for row in rows:
                seq = int(row["seq"])
                if seq > head.seq:
                    break  # appended since the head was read
                if seq != after + 1:
                    self._refuse(vouched, f"event(s) {after + 1}..{seq - 1} are missing")
                linked = row["prev_hash"] is not None and bytes(row["prev_hash"]) == prev
                if not linked or row["hash"] is None or bytes(row["hash"]) != event_hash(row, seq, prev):
                    self._refuse(vouched, f"event {seq} does not link to the chain from seq {vouched.seq} (hashes recomputed)")
                prev, after = bytes(row["hash"]), seq
        if prev != head.hash:
            self._refuse(vouched, f"the head at seq {head.seq} changed while it was checked")

    @staticmethod
    def _refuse(vouched: _Vouched, what: str) -> NoReturn:
        raise FailedPrecondition(
            f"refusing to sign an audit checkpoint: {what}, but the chain must hold the head {vouched.head.hex()[:16]}... "
            f"at seq {vouched.seq} ({vouched.how}) and link every later event to it. The log was changed behind the "
            "daemon's back; nothing is signed until the chain holds again: compare it with an earlier export "
            "(`ca-daemon audit verify --file`) and restore it"
        )

    async def run(self, interval_seconds: float) -> None:
        while True:
            await asyncio.sleep(interval_seconds)
            try:
                await asyncio.to_thread(self.checkpoint)
            except CaError as exc:
                log.error("audit checkpoint failed: %s", exc.message)
            except Exception:  # one failure of another kind must not end the periodic checkpoints
                log.exception("audit checkpoint failed")


# ---------------------------------------------------------------------------
# Export and verification
# ---------------------------------------------------------------------------


def stored_checkpoint_record(checkpoint: Checkpoint) -> dict[str, Any]:
    """A stored checkpoint as an export record."""
    return checkpoint_record(**dataclasses.asdict(checkpoint))


def export(store: SqlStore, out: TextIO) -> tuple[int, int]:
    """Write the whole log as JSON Lines (audit_format.py); returns (events, checkpoints) written.

    FailedPrecondition, and no end record written, at a row the database holds in a form no writer gives.
    """
    return write_export(out, (_readable(record) for record in live_records(store)))


def _readable(record: dict[str, Any]) -> dict[str, Any]:
    if record["type"] == "unreadable":
        which = f"event {record['seq']}" if record["seq"] is not None else f"the {record['table']} table"
        raise FailedPrecondition(
            f"{which} could not be read from the database ({record['why']}): it was changed behind the daemon's back; "
            "`ca-daemon audit verify --live` reports each"
        )
    return record


# A damaged log or table can hold a problem per row: the messages of the first ones are kept, the others counted.
_KEPT_PROBLEMS = 1000
# Each kept message is at most this long, and control characters in it are written as escapes.
_MESSAGE_BYTES = 2048
_CONTROL_ESCAPES = {code: f"\\x{code:02x}" for code in (*range(32), 127)}


@dataclass
class Report:
    """What verify() found. ok is True only with no problem at all."""

    events: int = 0
    checkpoints: int = 0
    last_checkpoint_seq: int = 0
    uncovered_events: int = 0
    problems: list[str] = field(default_factory=list)  # the first _KEPT_PROBLEMS; the rest are only counted
    more_problems: int = 0
    first_bad_seq: int | None = None
    # audit.gap events: the daemon found events it had written removed behind its back (a finding, not damage to this log).
    gap_events: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def fail(self, seq: int | None, message: str) -> None:
        """A problem; seq names the first bad event of the log itself (None for a finding in the tables, see reconcile).

        Messages quote what the file or database holds, which an attacker chose: each is kept as
        one printable line of bounded length (a lone surrogate could not even be printed).
        """
        if self.first_bad_seq is None and seq is not None:
            self.first_bad_seq = seq
        if len(self.problems) < _KEPT_PROBLEMS:
            printable = message.encode("utf-8", "backslashreplace").decode("utf-8").translate(_CONTROL_ESCAPES)
            self.problems.append(capped(printable, _MESSAGE_BYTES))
        else:
            self.more_problems += 1

    def summary(self) -> str:
        if self.ok:
            tail = f"; {self.uncovered_events} event(s) after the last checkpoint are not covered by a signature yet"
            tail = tail if self.uncovered_events else ""
            if self.gap_events:
                tail += (
                    f"; {len(self.gap_events)} audit.gap event(s), the first at seq {self.gap_events[0]}: the daemon found "
                    "events it had written removed from the log behind its back"
                )
            return f"OK: {self.events} events, {self.checkpoints} valid checkpoint(s), last at seq {self.last_checkpoint_seq}{tail}"
        where = f"first bad event: seq {self.first_bad_seq}; " if self.first_bad_seq is not None else ""
        more = len(self.problems) - 1 + self.more_problems
        return f"FAILED: {where}{self.problems[0]}" + (f" (+{more} more problem(s))" if more else "")


def read_export(lines: TextIO | Iterable[str]) -> Iterator[dict[str, Any]]:
    """Parse an export; a line that is not a JSON object becomes {"type": "unparseable"}.

    So does one with a key twice, or NaN or Infinity, which no writer produces: JSON readers
    disagree on which of two values counts, so an auditor's tool could show one while verify
    hashed the other. From a file (anything with readline), a line longer than
    MAX_EXPORT_LINE is not held, only skipped: memory stays bounded whatever the file holds.
    """
    for number, line in enumerate(_bounded_lines(lines), 1):
        if line is None:
            why = f"longer than {MAX_EXPORT_LINE} characters, which no export writes; not read"
            yield {"type": "unparseable", "line": number, "why": why}
            continue
        if not line.strip():
            continue
        why = "not a JSON object"
        try:
            record = json.loads(line, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
        except ValueError as exc:
            record, why = None, capped(str(exc), 200)
        if isinstance(record, dict) and (kind := record.get("type")) not in _EXPORT_TYPES:
            record, why = None, capped(f"its type is {kind!r}, not one of {', '.join(_EXPORT_TYPES)}", 200)
        yield record if isinstance(record, dict) else {"type": "unparseable", "line": number, "why": why}


_EXPORT_TYPES = ("header", "event", "checkpoint", "end")
# No export line comes near this (an event's text fields are bounded when written); a longer one is skipped unread.
MAX_EXPORT_LINE = 16 * 1024 * 1024


def _bounded_lines(source: TextIO | Iterable[str]) -> Iterator[str | None]:
    """The lines of source, None for one longer than MAX_EXPORT_LINE (read through in pieces, never held whole)."""
    readline = getattr(source, "readline", None)
    if readline is None:
        yield from source
        return
    while line := readline(MAX_EXPORT_LINE + 1):
        if len(line) <= MAX_EXPORT_LINE or line.endswith("\n"):
            yield line
            continue
        del line  # read through the rest holding one piece at a time
        ended = False
        while not ended:
            piece = readline(MAX_EXPORT_LINE)
            ended = not piece or piece.endswith("\n")
            del piece
        yield None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    record = dict(pairs)
    if len(record) != len(pairs):
        raise ValueError("a key appears twice")
    return record


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


@dataclass(frozen=True)
class Earlier:
    """What an auditor's earlier export of the same log holds: every event's chain hash and its last signed checkpoint.

    A later log must hold the same events up to the earlier file's last one: the chain ties each
    event to all before it, so the same hash at one seq means the same log up to there. Without
    this the daemon's checkpoints cannot tell a log rolled back or rewritten while no process
    remembered it (README, "Audit log") from a whole one: its own checkpoints then cover the
    new chain, and a later export verifies alone.
    """

    hashes: _ChainHashes
    last_seq: int
    checkpoint_seq: int
    checkpoint_head: str
    checkpoint_time: str
    exported_at: str


def read_earlier(records: Iterable[dict[str, Any]], public_key_pem: bytes) -> tuple[Report, Earlier]:
    """Verify an earlier export and keep what a later log must still hold; use it only if the report is ok.

    An export that verifies holds events 1..N in order, N its event count.
    """
    report, hashes, signed, exported_at = _verify(records, public_key_pem, export_file=True)
    last = signed.last
    return report, Earlier(
        hashes=hashes,
        last_seq=report.events,
        checkpoint_seq=(_int(last.get("seq")) or 0) if last else 0,
        checkpoint_head=str(last.get("head", "")) if last else "",
        checkpoint_time=str(last.get("time", "")) if last else "",
        exported_at=exported_at,
    )


def verify(
    records: Iterable[dict[str, Any]], public_key_pem: bytes, *, export_file: bool = False, earlier: Earlier | None = None
) -> Report:
    """Check an export (or the live database as records) against the audit public key.

    export_file: the records are an export file's (read_export), which must begin with a
    header of this version and end with its end record, agreeing with what the file holds:
    a copy that lost its last lines fails. The live database's records have neither.

    Detects: a changed field (hash mismatch), a deleted event (seq gap / broken link), an
    inserted event (duplicate seq / broken link), reordering (seq going backwards), and
    truncation (a checkpoint naming an event the log no longer has, or a checkpoint's
    count/head disagreeing with the log, which also catches a rewritten chain). Every signed
    checkpoint is compared with the chain once all events are read, wherever the file puts it.
    Events after the last checkpoint are reported as uncovered: nothing signed vouches for them.

    earlier (read_earlier): an auditor's earlier export, whose events this log must still hold
    unchanged, up to its last one (_compare_earlier).
    """
    return _verify(records, public_key_pem, export_file=export_file, earlier=earlier)[0]


def _verify(
    records: Iterable[dict[str, Any]], public_key_pem: bytes, *, export_file: bool, earlier: Earlier | None = None
) -> tuple[Report, _ChainHashes, _SignedHeads, str]:
    """verify(), also returning the chain hashes by seq, the validly signed checkpoints and the header's exported_at."""
    public = serialization.load_pem_public_key(public_key_pem)
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise FailedPrecondition("the audit public key must be an EC key")
    report = Report()
    prev_hash = GENESIS
    expected_seq = 1
    hashes_by_seq = _ChainHashes()
    signed = _SignedHeads()  # compared with the chain once every event is read
    max_checkpoint = 0
    envelope = _Envelope(required=export_file)
    restores: list[str] = []  # db.restore events, named when the log disagrees with an earlier export
    for record in records:
        if envelope.take(record, report):
            continue
        kind = record.get("type")
        if kind == "event":
            if record.get("action") == "db.restore":
                restores.append(f"seq {record.get('seq')} at {record.get('time')}: {record.get('details')}")
            elif record.get("action") == "audit.gap" and _int(record.get("seq")) is not None:
                report.gap_events.append(int(record["seq"]))
            linked = _verify_event(record, report, expected_seq, prev_hash)
            seq = _int(record.get("seq"))
            if seq is not None:
                hashes_by_seq.add(seq, linked)
                expected_seq = seq + 1
            prev_hash = linked
            report.events += 1
            continue
        if kind == "checkpoint":
            seq = _int(record.get("seq")) or 0
            if _checkpoint_signed(record, public, report):
                signed.add(record)
                report.checkpoints += 1
                report.last_checkpoint_seq = max(report.last_checkpoint_seq, seq)
            max_checkpoint = max(max_checkpoint, seq)
            continue
        why = f" ({record['why']})" if kind == "unparseable" else ""
        if kind == "unreadable" and not export_file:  # live_records: a row the database holds in a form no writer gives
            seq = _int(record.get("seq"))
            which = f"event {seq}" if seq is not None else f"the {record.get('table')} table"
            report.fail(seq, f"{which} could not be read from the database ({record.get('why')}): it was changed behind the daemon's back")
            expected_seq = expected_seq if seq is None else seq + 1  # the next event is not also "missing"
            continue
        report.fail(None, f"line {record.get('line', '?')} is not a valid export record{why}")
    # A signed head the chain still gives vouches for every event up to it: damage lies after the last such one.
    in_order = signed if signed.ordered else sorted(signed)  # an export writes them in seq order: no copy
    matching = array("q", (seq for seq, _, head in in_order if seq in hashes_by_seq and hashes_by_seq[seq] == head))
    for seq, count, head in in_order:
        _compare_checkpoint(seq, count, head, hashes_by_seq, report, matching)
    last_seq = expected_seq - 1
    if max_checkpoint > last_seq:
        report.fail(last_seq + 1, f"truncated: a checkpoint covers up to seq {max_checkpoint} but the log ends at seq {last_seq}")
    envelope.finish(report)
    report.uncovered_events = max(0, last_seq - report.last_checkpoint_seq)
    if earlier is not None:
        _compare_earlier(earlier, hashes_by_seq, last_seq, restores, report)
    return report, hashes_by_seq, signed, str(envelope.exported_at)


def _compare_earlier(earlier: Earlier, hashes_by_seq: _ChainHashes, last_seq: int, restores: list[str], report: Report) -> None:
    """Report the first event of the earlier export this log no longer holds as it was (one problem, the first)."""
    last = earlier.last_seq
    if report.ok and (last == 0 or (last in hashes_by_seq and hashes_by_seq[last] == earlier.hashes[last])):
        return  # a whole chain with the same hash at the earlier file's last seq holds all its events unchanged
    first = next(
        (seq for seq in range(1, earlier.last_seq + 1) if seq not in hashes_by_seq or hashes_by_seq[seq] != earlier.hashes[seq]),
        None,
    )
    if first is None:
        return
    gone = "is not in this log" if first not in hashes_by_seq else "differs in this log"
    when = f"the earlier export (exported {earlier.exported_at}) held events 1..{earlier.last_seq}"
    if first <= earlier.checkpoint_seq:
        what = (
            f"event {first} {gone}, but {when} and the audit key signed its head at seq {earlier.checkpoint_seq} "
            f"({earlier.checkpoint_head[:16]}..., signed {earlier.checkpoint_time}): this log, which ends at seq {last_seq}, "
            "was rolled back or rewritten since, and checkpoints signed later cover the new chain"
        )
    else:
        what = (
            f"event {first} {gone}, but {when}; no checkpoint covered it then (the earlier export's last was at seq "
            f"{earlier.checkpoint_seq}), so it was removed or changed before one did, and the chain went on without it"
        )
    if restores:
        what += f"; this log records {len(restores)} db.restore event(s), the last {restores[-1]}"
    report.fail(first, what)


@dataclass
class _Envelope:
    """An export's header and end record, and what the file holds between them, for verify()."""

    required: bool
    records: int = 0
    end: dict[str, Any] | None = None
    after_end: int = 0
    events: int = 0
    checkpoints: int = 0
    last_seq: Any = 0
    last_hash: Any = None
    exported_at: Any = None

    def take(self, record: dict[str, Any], report: Report) -> bool:
        """Count one record; True if it is the envelope's (header, end, or past the end), not the log's."""
        kind = record.get("type")
        first = self.records == 0
        self.records += 1
        if self.end is not None:
            self.after_end += 1
            return True
        if kind == "header":
            if first:
                _check_header(record, report)
                self.exported_at = record.get("exported_at")
            else:
                report.fail(None, "a second header in the middle of the file: records of two exports joined, or lines inserted")
            return True
        if first and self.required:
            report.fail(None, f"the file does not begin with a {EXPORT_FORMAT} header: not an export, or its first lines were lost")
        if kind == "end":
            self.end = record
            return True
        if kind == "event":
            self.events += 1
            self.last_seq, self.last_hash = record.get("seq"), record.get("hash")
        elif kind == "checkpoint":
            self.checkpoints += 1
        return False

    def finish(self, report: Report) -> None:
        if self.required and self.records == 0:
            report.fail(None, "the file is empty: no header, no events, no end record")
            return
        if self.after_end:
            report.fail(None, f"{self.after_end} record(s) follow the end record: lines were added after the export")
        end = self.end
        if end is None:
            if self.required:
                report.fail(
                    None,
                    f"the file has no end record (its last event is seq {self.last_seq}): it was cut short, "
                    "losing its last lines, or the export did not finish; export the log again",
                )
            return
        claimed = (end.get("events"), end.get("checkpoints"), end.get("last_seq"), end.get("last_hash"))
        if claimed == (self.events, self.checkpoints, self.last_seq, self.last_hash):
            return
        claimed_seq, held_seq = _int(end.get("last_seq")), _int(self.last_seq)
        missing = claimed_seq is not None and held_seq is not None and claimed_seq > held_seq
        same_head = end.get("last_seq") == self.last_seq and end.get("last_hash") != self.last_hash
        report.fail(
            held_seq + 1 if missing and held_seq is not None else None,
            f"the end record says {end.get('events')} event(s) and {end.get('checkpoints')} checkpoint(s) up to seq "
            f"{end.get('last_seq')}, the file holds {self.events} and {self.checkpoints} up to seq {self.last_seq}"
            + ("; its last event's hash differs" if same_head else "")
            + ": lines were dropped, added or changed since the export",
        )


def _check_header(record: dict[str, Any], report: Report) -> None:
    if record.get("format") != EXPORT_FORMAT:
        report.fail(None, f"not a {EXPORT_FORMAT} file (its header says format {record.get('format')!r})")
        return
    version = record.get("version")
    if version == 1:
        report.fail(
            None,
            f"a version 1 export, which has no end record, so a copy that lost its last lines cannot be told from a whole one; "
            f"export the log again (`ca-daemon audit export`, or `ca-daemon client audit-export`) to get version {EXPORT_VERSION}",
        )
    elif version != EXPORT_VERSION:
        report.fail(None, f"export version {version!r} is not one this ca-daemon reads (it writes and reads version {EXPORT_VERSION})")


# The form every writer gives a time (canonical_time), which _parse_time reads without strptime.
_WRITTEN_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}Z")


def _parse_time(text: Any) -> datetime:
    """A time of an export record, exactly as strptime("%Y-%m-%dT%H:%M:%S.%fZ") reads it (as UTC), errors too.

    strptime cost about 20 us an event, a quarter of `audit verify`: the writer's own form is read
    by datetime.fromisoformat instead, which gives the same value for it; anything else, and
    whatever fromisoformat refuses, goes to strptime as before.
    """
    if isinstance(text, str) and _WRITTEN_TIME.fullmatch(text):
        with contextlib.suppress(ValueError):
            return datetime.fromisoformat(text[:-1]).replace(tzinfo=UTC)
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


def _fields(record: dict[str, Any]) -> dict[str, Any]:
    return {
        "time": _parse_time(record["time"]),
        "actor": record["actor"],
        "action": record["action"],
        "outcome": record["outcome"],
        "serial": record.get("serial"),
        "device_id": record.get("device_id", ""),
        "key_id": record.get("key_id", ""),
        "request_digest": bytes.fromhex(record.get("request_digest", "")),
        "reason": record.get("reason", ""),
        "details": record.get("details", "{}"),
    }


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _verify_event(record: dict[str, Any], report: Report, expected_seq: int, prev_hash: bytes) -> bytes:
    """Report what is wrong with one event; the hash the next event must link to.

    That is the event's recorded hash, once the problems here are reported: a deleted event
    then shows as one gap and one broken link, not as a broken link at every later event.
    (A chain rewritten from some point on still fails against the signed checkpoints.)
    """
    seq = _int(record.get("seq"))
    recorded = _hex(record.get("hash"))
    if seq is None:
        report.fail(expected_seq, f"an event after seq {expected_seq - 1} has no valid seq")
        return recorded
    if seq < expected_seq:
        report.fail(seq, f"event seq {seq} appears after seq {expected_seq - 1}: reordered or inserted")
    elif seq > expected_seq:
        report.fail(expected_seq, f"event(s) {expected_seq}..{seq - 1} are missing: deleted")
    if record.get("prev_hash") != prev_hash.hex():
        report.fail(seq, f"event {seq} does not link to the event before it (prev_hash differs): deleted, inserted or reordered")
    try:
        fields = _fields(record)
        computed = event_hash(fields, seq, prev_hash)
    except (KeyError, ValueError, TypeError) as exc:
        report.fail(seq, f"event {seq} is malformed: {exc}")
        return recorded
    off = _off_form(record, fields, seq)
    if off is not None:
        report.fail(seq, f"event {seq} has {off!r} in a form no export writes, which its hash does not tell apart: the line was edited")
    if recorded != computed:
        # Recompute against its own claimed predecessor: a mismatch there means the event itself was changed.
        try:
            own = event_hash(_fields(record), seq, bytes.fromhex(record.get("prev_hash") or ""))
        except ValueError:
            own = b""
        if recorded != own:
            report.fail(seq, f"event {seq} was changed: its content does not match its hash")
    return recorded


def _off_form(record: dict[str, Any], fields: dict[str, Any], seq: int) -> str | None:
    """The first key of an event record that is not exactly as event_record writes the fields it hashes to; None if all are.

    The hash covers values, not their spelling: absent text hashes alike whether written "", null
    or left out, and a time or digest parses from several spellings. Only the writer's own
    form is accepted, so no two different lines verify as the same event.
    """
    chain = {"prev_hash": _hex(record.get("prev_hash")), "hash": _hex(record.get("hash"))}
    written = event_record({**fields, **chain, "seq": seq})
    if record == written and list(map(type, map(record.__getitem__, written))) == list(map(type, written.values())):
        return "serial" if record["serial"] == "" else None  # the common case, without the search for the first key below
    for key in sorted(written.keys() | record.keys()):
        if key not in record or key not in written or type(record[key]) is not type(written[key]) or record[key] != written[key]:
            return key
    return "serial" if record["serial"] == "" else None


def _hex(value: Any) -> bytes:
    try:
        return bytes.fromhex(value) if isinstance(value, str) else b""
    except ValueError:
        return b""


def _checkpoint_signed(record: dict[str, Any], public: ec.EllipticCurvePublicKey, report: Report) -> bool:
    """Whether the audit key signed this checkpoint (reported if not)."""
    seq = _int(record.get("seq")) or 0
    try:
        time = _parse_time(record["time"])
        message = checkpoint_message(
            seq=seq,
            count=int(record["count"]),
            head=bytes.fromhex(record["head"]),
            time=time,
            key_id=record["key_id"],
        )
        signature = base64.b64decode(record["signature"])
        public.verify(signature, message, ec.ECDSA(hashes.SHA256()))
    except (KeyError, ValueError, TypeError, InvalidSignature):
        report.fail(None, f"the checkpoint at seq {seq} has no valid signature by the audit key")
        return False
    # The signature covers values: a head, time or signature spelt another way, or a count of 4.5, verifies alike.
    head = bytes.fromhex(record["head"])
    key_id, count = record["key_id"], int(record["count"])
    written = checkpoint_record(seq=seq, count=count, head_hash=head, time=time, key_id=key_id, signature=signature)
    if record != written or any(type(record[key]) is not type(written[key]) for key in written):
        report.fail(None, f"the checkpoint at seq {seq} is not in the form an export writes it, which its signature does not tell apart")
        return False
    return True


class _ChainHashes:
    """seq -> the chain hash of the first event read with that seq, for comparing checkpoints after the last event.

    Checkpoints may stand anywhere in an export, so every hash is kept until the end: 32 bytes
    each in one array while the seqs run 1, 2, 3, ... (a dict of bytes took about 190 bytes an
    event: 400 MB for two million), and a dict only for seqs out of that order (a tampered log).
    """

    def __init__(self) -> None:
        self._run = bytearray()  # the hashes of seq 1 .. len(self._run) // 32
        self._others: dict[int, bytes] = {}

    def add(self, seq: int, chain_hash: bytes) -> None:
        held = len(self._run) // 32
        if seq == held + 1 and len(chain_hash) == 32 and seq not in self._others:
            self._run += chain_hash
        elif not 1 <= seq <= held:
            self._others.setdefault(seq, chain_hash)

    def __contains__(self, seq: int) -> bool:
        return 1 <= seq <= len(self._run) // 32 or seq in self._others

    def __getitem__(self, seq: int) -> bytes:
        if 1 <= seq <= len(self._run) // 32:
            return bytes(self._run[(seq - 1) * 32 : seq * 32])
        return self._others[seq]

    def lowest(self, default: int) -> int:
        """The lowest seq held (default when none is)."""
        if self._run:
            return 1
        return min(self._others, default=default)


class _SignedHeads:
    """The validly signed checkpoints as (seq, count, head), 48 bytes each, for comparing with the chain at the end.

    The parsed record was held instead, about 1.1 KB a checkpoint: 118 MB for a log with
    100,000 of them (a year of checkpoints every 300 s, before restarts). last is the record of
    the highest seq, which read_earlier keeps.
    """

    _ENTRY = struct.Struct(">qq32s")

    def __init__(self) -> None:
        self._packed = bytearray()
        self.last: dict[str, Any] | None = None
        self.ordered = True  # each seq at least the one before, as an export writes them

    def add(self, record: dict[str, Any]) -> None:
        """A record _checkpoint_signed accepted: its seq, count and head are the audit key's."""
        seq = _int(record.get("seq")) or 0
        self._packed += self._ENTRY.pack(seq, int(record["count"]), bytes.fromhex(record["head"]))
        highest = -1 if self.last is None else _int(self.last.get("seq")) or 0
        self.ordered = self.ordered and seq >= highest
        if seq > highest:
            self.last = record

    def __iter__(self) -> Iterator[tuple[int, int, bytes]]:
        return self._ENTRY.iter_unpack(self._packed)


def _compare_checkpoint(seq: int, count: int, head: bytes, hashes_by_seq: _ChainHashes, report: Report, matching: array[int]) -> None:
    """Report a signed checkpoint that disagrees with the chain, wherever the file placed it.

    Called once every event is read: a checkpoint moved ahead of its event (where the chain
    was not known yet) is compared all the same. A checkpoint beyond the last event is
    reported as truncation by verify(); one naming an event missing from the middle of the
    log, as that event's gap. matching: the seqs of the signed checkpoints the chain agrees
    with, in order; the first bad event is after the last of them below this one.
    """
    if seq not in hashes_by_seq:
        return
    if count != seq:
        report.fail(seq, f"the checkpoint at seq {seq} counts {count} events, but seq numbers start at 1")
    if hashes_by_seq[seq] != head:
        below = bisect.bisect_left(matching, seq)
        vouched = matching[below - 1] if below else 0
        first = vouched + 1 if vouched else min(hashes_by_seq.lowest(seq), seq)
        where = (
            f"the events in {first}..{seq} were altered (the signed checkpoint at seq {vouched} still matches the chain)"
            if vouched
            else f"the events up to seq {seq} were altered"
        )
        report.fail(
            first,
            f"the signed checkpoint at seq {seq} names head {head.hex()[:16]}..., the log's chain gives "
            f"{hashes_by_seq[seq].hex()[:16]}...: {where}",
        )


def reconcile(store: SqlStore, report: Report) -> None:
    """Report rows of the certificates and revocations tables that disagree with the events that recorded them.

    The chain vouches for events only; the CA acts on the tables (Revoke looks a serial up in
    certificates, each full CRL lists the revocations rows), and a row deleted or changed there
    misleads it and every relying party while the log still verifies. The daemon never deletes
    such a row (a lifted hold keeps its row), so each of these is a change behind its back:

    - a certificate.issue event whose certificate row is gone: the CA cannot revoke it;
    - a certificates row no certificate.issue (or key.link) event issued: the event was cut from the log, which a chain
      cut after its last checkpoint does not show;
    - a serial whose last certificate.revoke event has no revocations row, one lifted, or another
      reason: the next full CRL leaves it out, or lists it for another reason;
    - a serial whose last event lifted its hold but whose row is revoked again, and a revocations
      row no event records: the CRLs list a certificate the log shows valid;
    - a revocation in force whose row, under the same reason, differs from its event in what the
      CRLs are built from: the stored CRL entry (entry_der, which every full CRL copies as it is),
      the CA key it is filed under, its dates, or the certificate's notAfter (after which full
      CRLs drop the entry);
    - a certificates row whose certificate is not the one its certificate.issue event names (by
      SHA-256; recorded since 2026-11-26): a retried Sign and GetCertificate hand the row out;
    - a ca_keys row whose public key is not the one its key.generate event names (by SHA-256;
      recorded since 2026-11-27): the signatures checked above are checked with that key.

    Needs the database (`audit verify --live`): an export has no tables.
    """
    try:
        found = AuditStore(store).records_and_their_events()
    except _ROW_FAULTS as exc:
        _raise_unless_row_fault(AuditStore(store), exc)
        report.fail(
            None,
            f"the certificates and revocations tables could not be compared with the events ({_unreadable(None, '', exc)['why']}): "
            "a row holds what the daemon never writes, changed behind its back",
        )
        found = RecordsAndEvents([], [], [], [])
    for seq, serial in found.unrecorded_issuances:
        report.fail(
            None,
            f"event {seq} records the issuance of serial {serial}, which the certificates table no longer holds: "
            "the CA cannot revoke it (Revoke answers NOT_FOUND)",
        )
    for d in found.revocations:
        if d.action == "certificate.unrevoke":
            held = d.row[0] if d.row else "?"
            report.fail(
                None,
                f"event {d.seq} records that the hold on {d.serial} was lifted, but the revocations table has it revoked "
                f"({held}) with no event recording that: the next full CRL lists it",
            )
        elif d.row is None:
            report.fail(
                None,
                f"event {d.seq} records the revocation of {d.serial} ({d.reason}), which the revocations table no longer "
                "holds: the next full CRL leaves it out",
            )
        elif d.row[1]:
            report.fail(
                None,
                f"event {d.seq} records the revocation of {d.serial} ({d.reason}), but the revocations table has it lifted "
                "with no certificate.unrevoke event: the next full CRL leaves it out",
            )
        else:
            report.fail(
                None,
                f"event {d.seq} records the revocation of {d.serial} as {d.reason}, the revocations table says {d.row[0]}: "
                "the daemon acts on that (only a certificate_hold can be lifted)",
            )
    for serial, reason in found.unlogged_revocations:
        report.fail(None, f"the revocations table revokes {serial} ({reason}), but no event records its revocation: the CRLs list it")
    for serial, device_id, key_id in found.unlogged_certificates:
        report.fail(
            None,
            f"the certificates table holds serial {serial} (device {device_id}, issued by CA key {key_id}), but no event records "
            "its issuance: its certificate.issue event was removed from the log (events after the last checkpoint can be), "
            "or the row was added behind the daemon's back",
        )
    audit = AuditStore(store)
    # What the checks below verify signatures with is the ca_keys rows' public keys: each must be the one its key.generate
    # event recorded (by SHA-256, since 2026-11-27), or a key put in the store could vouch for certificates it signed.
    for seq, key_id, details, public_key_der in audit.key_generations():
        try:
            recorded = json.loads(details).get("public_key_sha256", "")
        except (ValueError, AttributeError):
            recorded = ""
        if recorded and public_key_der is not None and hashlib.sha256(public_key_der).hexdigest() != recorded:
            report.fail(
                None,
                f"event {seq} records the generation of CA key {key_id} with the public key of SHA-256 {recorded[:16]}..., but the "
                f"ca_keys table holds another one for it ({hashlib.sha256(public_key_der).hexdigest()[:16]}...): what was checked "
                "against that key's signature below proves nothing, and the daemon refuses to start with a certificate that "
                "does not match the token's key",
            )
    issuers = {}
    for key in store.list_ca_keys():
        try:
            issuers[key.key_id] = serialization.load_der_public_key(key.public_key_der)
        except (ValueError, UnsupportedAlgorithm):
            report.fail(None, f"CA key {key.key_id}'s public key in the store does not read, so what it signed cannot be checked")
    for seq, serial, details, der in _read_through(audit.issued_certificates(), "certificates", lambda row: row[1], report, audit):
        try:
            recorded = json.loads(details).get("certificate_sha256", "")
        except (ValueError, AttributeError):
            recorded = ""
        held = hashlib.sha256(der).hexdigest()
        if recorded and held != recorded:
            report.fail(
                None,
                f"event {seq} records the issuance of serial {serial} as the certificate with SHA-256 {recorded[:16]}..., but "
                f"the certificates table holds another one for it ({held[:16]}...): a retried Sign and GetCertificate hand that out",
            )
    for revocation in _read_through(audit.revocations_in_force(), "revocations", lambda row: row.serial, report, audit):
        for problem in _row_problems(revocation, issuers):
            report.fail(None, f"event {revocation.seq} records the revocation of {revocation.serial} ({revocation.reason}), but {problem}")


def _read_through(rows: Iterator[_Row], table: str, serial_of: Callable[[_Row], str], report: Report, audit: AuditStore) -> Iterator[_Row]:
    """The rows, until one the driver cannot read (text in a time or BLOB column of SQLite, text that is not UTF-8):
    that is reported, not raised. An outage still raises (_raise_unless_row_fault)."""
    last = ""
    try:
        for row in rows:
            last = serial_of(row)
            yield row
    except _ROW_FAULTS as exc:
        _raise_unless_row_fault(audit, exc)
        after = f" after serial {last}" if last else ""
        reason = _unreadable(None, table, exc)["why"]
        report.fail(None, f"the {table} table could not be read to the end{after} ({reason}): the rest was not compared")


def _row_problems(revocation: RevocationInForce, issuers: dict[str, PublicKeyTypes]) -> list[str]:
    """How a revocation row differs from its event in what the CRLs are built from (see reconcile).

    issuers: each CA key's public key. The certificate's notAfter is read only from a
    certificate of that serial signed by the event's CA key: the certificates row is no more
    vouched for than the revocations row, and an expired or unsigned stand-in there would
    otherwise make a moved-back not_after look right.
    """
    try:
        reason = RevocationReason[revocation.reason.upper()]
        invalidity_text = json.loads(revocation.details).get("invalidity_date", "")
        invalidity = datetime.fromisoformat(invalidity_text) if invalidity_text else None
        serial = int(revocation.serial, 16)
    except (ValueError, KeyError, TypeError, AttributeError):  # an event the daemon never writes
        return ["the event's serial, reason or invalidity date cannot be read, so its row cannot be compared"]
    problems = []
    if revocation.row_issuer_key_id != revocation.key_id:
        problems.append(
            f"the revocations table files it under CA key {revocation.row_issuer_key_id}, not {revocation.key_id}: "
            f"the CRLs of {revocation.key_id} leave it out"
        )
    if (revocation.row_revoked_at, revocation.row_invalidity_date) != (revocation.revoked_at, invalidity):
        problems.append(
            f"the revocations table dates it {_dates(revocation.row_revoked_at, revocation.row_invalidity_date)}, "
            f"the event {_dates(revocation.revoked_at, invalidity)}"
        )
    if revocation.entry_der != crl_der.revoked_entry(serial, revocation.revoked_at, reason.value, invalidity):
        problems.append(f"the CRL entry stored for it (entry_der) reads {_entry_text(revocation.entry_der)}: every full CRL copies that")
    if revocation.certificate_der is None:  # the revocations row's foreign key forbids it: a row deleted behind the daemon's back
        return [*problems, "the certificates table no longer holds its certificate, so its notAfter cannot be compared"]
    certificate = _issued_certificate(revocation.certificate_der, serial, issuers.get(revocation.key_id))
    if certificate is None:
        return [
            *problems,
            f"the certificates table holds for it no certificate of serial {revocation.serial} signed by CA key "
            f"{revocation.key_id}, so its notAfter cannot be compared",
        ]
    not_after = certificate.not_valid_after_utc
    if revocation.row_not_after != not_after:
        problems.append(
            f"the revocations table says the certificate expires {revocation.row_not_after.isoformat()}, its certificate "
            f"{not_after.isoformat()}: full CRLs drop an entry once it has expired"
        )
    return problems


def _issued_certificate(der: bytes, serial: int, issuer_key: PublicKeyTypes | None) -> x509.Certificate | None:
    """The certificate in der if it has this serial and a signature by issuer_key, else None.

    The key's signature, not cryptography's verify_directly_issued_by: that also compares the
    issuer name byte for byte with the CA certificate the store holds now, and a CA certificate
    installed again for the same key (renewed by its parent, its subject spelt another way) would
    make every certificate the key signed before look forged.
    """
    try:
        certificate = x509.load_der_x509_certificate(der)
        if certificate.serial_number != serial:
            return None
        signature, tbs, digest = certificate.signature, certificate.tbs_certificate_bytes, certificate.signature_hash_algorithm
        if isinstance(issuer_key, ec.EllipticCurvePublicKey) and digest is not None:
            issuer_key.verify(signature, tbs, ec.ECDSA(digest))
        elif isinstance(issuer_key, rsa.RSAPublicKey) and digest is not None:
            issuer_key.verify(signature, tbs, padding.PKCS1v15(), digest)
        elif isinstance(issuer_key, ed25519.Ed25519PublicKey):
            issuer_key.verify(signature, tbs)
        else:
            return None
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):  # unreadable DER, a bad signature
        return None
    return certificate


def _dates(revoked_at: datetime, invalidity: datetime | None) -> str:
    return revoked_at.isoformat() + (f" (invalid since {invalidity.isoformat()})" if invalidity else "")


def _entry_text(entry_der: bytes) -> str:
    """A stored CRL entry as a person reads it: serial, date and reason, or that no CRL parser would read it."""
    try:
        entry = crl_der.read_entry(entry_der)
        try:
            reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason.name
        except x509.ExtensionNotFound:
            reason = "unspecified"
        return f"serial {entry.serial_number:x}, revoked {entry.revocation_date_utc.isoformat()}, {reason}"
    except Exception:  # ValueError, DuplicateExtension, ...: whatever makes it unreadable, it is reported, not raised
        return "as no valid CRL entry"


def live_records(store: SqlStore) -> Iterator[dict[str, Any]]:
    """The live database as export records (events in order, each checkpoint after its event).

    A row that does not convert (SQLite keeps whatever is written: text in a time or BLOB
    column) becomes {"type": "unreadable", "seq", "why"}, which verify() reports as that
    event's damage, and the events after it are read on; unreadable checkpoints, one such
    record without a seq, and none of them is used.
    """
    audit = AuditStore(store)
    try:
        last = audit.last_checkpoint()
    except _ROW_FAULTS as exc:
        _raise_unless_row_fault(audit, exc)
        return itertools.chain([_unreadable(None, "audit_checkpoints", exc)], _live_events(audit))
    # Only the checkpoints stored now, whose events are all there before any is read: one signed
    # while the export runs could cover an event it did not read. They are read in pages as they go.
    return interleave(_live_events(audit), _live_checkpoints(audit, last.seq if last else 0))


def _live_checkpoints(audit: AuditStore, up_to: int) -> Iterator[dict[str, Any]]:
    """The stored checkpoints of seqs up to up_to as export records, a page at a time (live_records)."""
    after = 0
    while after < up_to:
        try:
            page = audit.checkpoints(after, DEFAULT_CHECKPOINT_PAGE)
        except _ROW_FAULTS as exc:
            _raise_unless_row_fault(audit, exc)
            yield _unreadable(None, "audit_checkpoints", exc)
            return
        for checkpoint in page:
            if checkpoint.seq > up_to:
                return
            yield stored_checkpoint_record(checkpoint)
        if not page:
            return
        after = page[-1].seq


# What a row the database holds in a form no writer gives raises as it is read: SQLAlchemy's conversions (text in a
# time or BLOB column of SQLite), and, for text that is not UTF-8, the driver's error, which the store reports as
# StoreUnavailable like an outage (_raise_unless_row_fault tells them apart).
_ROW_FAULTS = (ValueError, TypeError, StoreUnavailable)


def _raise_unless_row_fault(audit: AuditStore, exc: Exception) -> None:
    """Raise exc again if it is the database being unreachable: then it does not answer the next query either."""
    if isinstance(exc, StoreUnavailable):
        audit.next_seq(0)  # raises StoreUnavailable itself in an outage


def _unreadable(seq: int | None, table: str, exc: Exception) -> dict[str, Any]:
    why = exc.message.removeprefix("the database is unavailable: ") if isinstance(exc, CaError) else str(exc)
    return {"type": "unreadable", "seq": seq, "table": table, "why": capped(why, 200)}


def _live_events(audit: AuditStore, batch: int = 5000) -> Iterator[dict[str, Any]]:
    """Every event as an export record, in seq order, an unreadable row as an "unreadable" record (live_records)."""
    after = 0
    while True:
        try:
            rows = audit.event_page(after, batch)
        except _ROW_FAULTS as exc:  # a row of this page does not convert: read them one at a time
            _raise_unless_row_fault(audit, exc)
            seq = audit.next_seq(after)
            if seq is None:
                return
            try:
                rows = audit.events(EventFilter(after_seq=after), 1)
            except _ROW_FAULTS as exc:
                _raise_unless_row_fault(audit, exc)
                yield _unreadable(seq, "audit_events", exc)
                after = seq
                continue
        if not rows:
            return
        for row in rows:
            try:
                record = event_record(row)
            except (ValueError, TypeError) as exc:
                record = _unreadable(int(row["seq"]), "audit_events", exc)
            yield record
        after = int(rows[-1]["seq"])


__all__ = [
    "AuditLog",
    "Checkpointer",
    "Earlier",
    "Report",
    "audit_public_key_pem",
    "ensure_audit_key",
    "event_record",
    "export",
    "live_records",
    "read_earlier",
    "read_export",
    "reconcile",
    "verify",
]


# ---------------------------------------------------------------------------
# Reading the log for auditors (StreamAuditEvents)
# ---------------------------------------------------------------------------

DEFAULT_PAGE = 500
DEFAULT_CHECKPOINT_PAGE = 1000
# The largest sequence number the stores can hold (SQLite INTEGER, PostgreSQL bigint). A request's
# after_seq is a uint64: one beyond this is "after the last event there can be", an empty answer.
MAX_SEQ = 2**63 - 1


def _after(seq: int) -> int:
    return min(seq, MAX_SEQ)


@dataclass(frozen=True)
class AuditQuery:
    """A StreamAuditEvents request as the domain sees it."""

    after_seq: int = 0
    from_time: datetime | None = None
    actions: tuple[str, ...] = ()
    device_id: str = ""
    serial: str = ""
    page_size: int = 0
    max_events: int = 0
    page_token: str = ""


MAX_ACTIONS = 256  # in one StreamAuditEvents filter


class AuditReader:
    """Pages of the audit log, resumable by an opaque token bound to the filters."""

    def __init__(self, store: SqlStore) -> None:
        self._audit = AuditStore(store)

    async def checkpoints(self, after_seq: int = 0, page_size: int = 0) -> list[Checkpoint]:
        """One page of signed checkpoints after after_seq (ListAuditCheckpoints)."""
        if page_size > MAX_PAGE:
            raise InvalidRequest(f"page_size {page_size} is too large", field="page_size", expected=f"at most {MAX_PAGE}")
        return await asyncio.to_thread(self._audit.checkpoints, _after(after_seq), page_size or DEFAULT_CHECKPOINT_PAGE)

    async def pages(self, query: AuditQuery) -> AsyncIterator[tuple[list[dict[str, Any]], str]]:
        from ca_daemon.store.audit_store import EventFilter

        if query.page_size > MAX_PAGE:
            raise InvalidRequest(f"page_size {query.page_size} is too large", field="page_size", expected=f"at most {MAX_PAGE}")
        if len(query.actions) > MAX_ACTIONS:  # each is a bound parameter: PostgreSQL takes at most 65,535 in a statement
            raise InvalidRequest(
                f"{len(query.actions)} actions: filter on at most {MAX_ACTIONS} (the log has a few dozen kinds of event)",
                rule="audit-filter",
                field="actions",
                expected=f"at most {MAX_ACTIONS} actions",
            )
        size = query.page_size or DEFAULT_PAGE
        serial = serial_hex(parse_serial(query.serial)) if query.serial else ""  # spelled as GetCertificate and Revoke take it
        digest = _filter_digest(query.actions, query.device_id, serial)
        after, from_time = _after(query.after_seq), query.from_time
        if query.page_token:
            after = _parse_token(query.page_token, digest)
            from_time = None
        sent = 0
        while True:
            limit = size if not query.max_events else min(size, query.max_events - sent)
            if limit <= 0:
                return
            flt = EventFilter(after_seq=after, from_time=from_time, actions=query.actions, device_id=query.device_id, serial=serial)
            rows = await asyncio.to_thread(self._audit.events, flt, limit)
            if rows:
                after = int(rows[-1]["seq"])
            sent += len(rows)
            yield rows, _token(after, digest)
            if len(rows) < limit:
                return


def _filter_digest(actions: tuple[str, ...], device_id: str, serial: str) -> str:
    import hashlib

    return hashlib.sha256(json.dumps([sorted(actions), device_id, serial]).encode()).hexdigest()[:16]


def _token(after: int, digest: str) -> str:
    return base64.urlsafe_b64encode(json.dumps({"after": after, "f": digest}).encode()).decode().rstrip("=")


def _parse_token(token: str, digest: str) -> int:
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        after, filters = int(data["after"]), str(data["f"])
    # OverflowError: {"after": 1e400} is infinity. RecursionError: JSON nested deeper than the decoder goes ("[[[[...").
    except (ValueError, KeyError, TypeError, OverflowError, RecursionError):
        raise InvalidRequest("page_token is not a token this server issued", field="page_token") from None
    if not 0 <= after <= MAX_SEQ:
        raise InvalidRequest("page_token is not a token this server issued", field="page_token")
    if filters != digest:
        raise InvalidRequest(
            "page_token was issued for other filters; resume with the same actions, device_id and serial",
            field="page_token",
            expected="the filters of the request that returned the token",
        )
    return after
