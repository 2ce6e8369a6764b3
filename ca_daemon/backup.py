"""Backups of the embedded SQLite store: a consistent copy taken while the daemon serves, checked before it is kept.

The store is what a CA cannot rebuild: which serials it issued (so it can revoke them),
its revocations and CRL numbers, and the audit log. SQLite's online backup API
(`sqlite3.Connection.backup`) copies the database as of one read transaction, so an
issuance committed meanwhile is in the copy whole or not at all, and the daemon is not
paused. The copy is kept only after the checks a restore relies on: SQLite's integrity
check, a known schema version, the audit hash chain with its checkpoint signatures, and
the certificates and revocations tables against the events that recorded them (what
`audit verify --live` compares: the chain does not vouch for the tables).

A restore (daemon stopped) checks the backup the same way and moves the current database
aside rather than deleting it. When that database can still be read and knows what the
backup does not (certificates it could no longer revoke, revocations that would come off
the next CRL or go back to an earlier state, CRL numbers that would go back, mTLS client
certificates and their revocations, audit events and signed checkpoints), the restore is
refused unless the operator accepts the loss. So it is when the CRL files the daemon
wrote list revocations the backup lacks or numbers above its own: they outlive a
database in place that no longer reads.

PostgreSQL deployments back up with PostgreSQL's own tools (pg_dump, or base backups with
WAL archiving); nothing here would do better.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import secrets
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from ca_daemon import audit
from ca_daemon.errors import ConfigError, FailedPrecondition
from ca_daemon.files import fsync_path
from ca_daemon.store import open_store, schema, serial_hex
from ca_daemon.verify import crl_number, delta_base

_COMPANIONS = ("-wal", "-shm", ".writelock")
# Room a copy needs beyond its own pages while it is checked: SQLite's shared-memory index (32 KiB) and its log.
_CHECK_ROOM = 256 * 1024


@dataclass(frozen=True)
class BackupSummary:
    """What a checked backup holds."""

    path: Path
    sha256: str
    schema_version: int
    certificates: int
    revocations: int
    audit: audit.Report

    def describe(self) -> str:
        return (
            f"{self.path}: schema {self.schema_version}, {self.certificates} certificate(s), {self.revocations} revocation(s), "
            f"audit log {self.audit.summary()}; sha256 {self.sha256}"
        )


@dataclass(frozen=True)
class AuditLoss:
    """The audit log's part of a Loss: events and signed checkpoints the backup's log does not have."""

    events: int = 0
    first_seq: int = 0  # the first and last seq of those events: the restored log reuses these numbers
    last_seq: int = 0
    head_hash: str = ""  # hex hash of the last of them, as an auditor's export or checkpoint shows it
    checkpoints: int = 0
    last_checkpoint_seq: int = 0

    def __bool__(self) -> bool:
        return bool(self.events or self.checkpoints)


@dataclass(frozen=True)
class Loss:
    """What the database in place knows and a backup does not: what restoring the backup forgets."""

    certificate_serials: tuple[str, ...] = ()
    # Active in the database in place, absent or lifted in the backup.
    revocation_serials: tuple[str, ...] = ()
    # Any other revocation row in place that the backup lacks in the same state (reason, dates, lift, change_seq).
    revocation_changes: tuple[str, ...] = ()
    # Per issuer: (the backup's highest CRL number, the database in place's), where the latter is higher.
    crl_numbers: tuple[tuple[str, int, int], ...] = ()
    mtls_certificate_serials: tuple[str, ...] = ()
    mtls_revocation_serials: tuple[str, ...] = ()
    # CA keys whose record differs: (key_id, its status in the backup or "absent", its status in place).
    ca_keys: tuple[tuple[str, str, str], ...] = ()
    audit: AuditLoss = AuditLoss()
    # CRL files in the CRL directory that no CA key of the backup signed (a key made after it?), or that are no CRL.
    unverified_crl_files: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(
            self.unverified_crl_files
            or self.ca_keys
            or self.certificate_serials
            or self.revocation_serials
            or self.revocation_changes
            or self.crl_numbers
            or self.mtls_certificate_serials
            or self.mtls_revocation_serials
            or self.audit
        )

    def describe(self) -> str:
        parts = []
        if self.ca_keys:
            keys = ", ".join(f"{key_id} {current} (in the backup: {then})" for key_id, then, current in self.ca_keys)
            parts.append(
                f"{len(self.ca_keys)} CA key change(s): {keys} (the backup's signing key would sign again, "
                "even one retired or switched away from in an emergency, and later keys would be forgotten)"
            )
        if self.certificate_serials:
            parts.append(f"{len(self.certificate_serials)} certificate(s) (the daemon could not revoke them by serial)")
        if self.revocation_serials:
            parts.append(f"{len(self.revocation_serials)} revocation(s) (those certificates would come off the next CRL)")
        if self.revocation_changes:
            parts.append(
                f"{len(self.revocation_changes)} later change(s) to revocation(s) (reason, dates or a lifted hold would go back: "
                "a hold made final would be a hold again, which can be lifted)"
            )
        for issuer, restored, current in self.crl_numbers:
            parts.append(f"CRLs of {issuer} numbered up to {current} (the backup's end at {restored}; numbers must never go back)")
        if self.mtls_certificate_serials:
            n = len(self.mtls_certificate_serials)
            parts.append(f"{n} mTLS client certificate(s) (`mtls revoke` could not revoke them: they would stay valid)")
        if self.mtls_revocation_serials:
            n = len(self.mtls_revocation_serials)
            parts.append(f"{n} mTLS revocation(s) (those clients would be let in again once the client CRL is re-signed)")
        if self.audit.events:
            parts.append(
                f"{self.audit.events} audit event(s), seq {self.audit.first_seq} to {self.audit.last_seq} "
                "(new events would reuse those numbers)"
            )
        if self.audit.checkpoints:
            parts.append(
                f"{self.audit.checkpoints} signed audit checkpoint(s), the last at seq {self.audit.last_checkpoint_seq} "
                "(an auditor holding one would find the restored log contradicting it)"
            )
        if self.unverified_crl_files:
            parts.append(
                f"{len(self.unverified_crl_files)} CRL file(s) no CA key of the backup signed: "
                f"{', '.join(self.unverified_crl_files)} (a CA key made after the backup?)"
            )
        return "; ".join(parts)

    def merged(self, other: Loss) -> Loss:
        """Both losses: what the database in place and the published CRL files each show the backup lacks."""
        numbers: dict[str, tuple[int, int]] = {}
        for issuer, restored, current in (*self.crl_numbers, *other.crl_numbers):
            before = numbers.get(issuer, (restored, current))
            numbers[issuer] = (max(before[0], restored), max(before[1], current))
        revocations = tuple(sorted({*self.revocation_serials, *other.revocation_serials}))
        return Loss(
            certificate_serials=tuple(sorted({*self.certificate_serials, *other.certificate_serials})),
            revocation_serials=revocations,
            revocation_changes=tuple(sorted({*self.revocation_changes, *other.revocation_changes} - set(revocations))),
            crl_numbers=tuple((issuer, restored, current) for issuer, (restored, current) in sorted(numbers.items())),
            mtls_certificate_serials=tuple(sorted({*self.mtls_certificate_serials, *other.mtls_certificate_serials})),
            mtls_revocation_serials=tuple(sorted({*self.mtls_revocation_serials, *other.mtls_revocation_serials})),
            ca_keys=tuple(sorted({*self.ca_keys, *other.ca_keys})),
            audit=self.audit or other.audit,
            unverified_crl_files=tuple(sorted({*self.unverified_crl_files, *other.unverified_crl_files})),
        )


@dataclass(frozen=True)
class RestoreSummary:
    restored: BackupSummary
    # Where the database that was in place went (None: there was none).
    moved_aside: Path | None
    # What the database in place and the CRL files this CA published hold beyond the backup.
    lost: Loss
    # Why the database in place could not be read ("": it could, or there was none); then only the CRL files were compared.
    unread: str = ""


def sqlite_file(store_url: str) -> Path:
    """The database file of a SQLite store URL; ConfigError for PostgreSQL (its own tools back it up)."""
    if not store_url.startswith("sqlite:///") or ":memory:" in store_url:
        raise ConfigError(
            "store.url is not a SQLite file: back PostgreSQL up with its own tools "
            "(pg_dump --serializable-deferrable, or base backups with WAL archiving); see README.md"
        )
    return Path(store_url.removeprefix("sqlite:///"))


def check_destination(out: Path, source: Path | None = None) -> None:
    """FailedPrecondition unless out can be a new backup file: it must not exist, its directory must (and have room for source)."""
    if out.exists():
        raise FailedPrecondition(f"{out} exists; a backup never overwrites a file: name a new one")
    if not out.parent.is_dir():
        state = "is not a directory" if out.parent.exists() else "does not exist"
        raise FailedPrecondition(f"{out.parent} {state}; create the directory the backup goes to first")
    if source is not None:
        _check_room(out.parent, _copy_size(source), f"a backup of {source}", "nothing was written")


def _copy_size(database: Path) -> int:
    """What a copy of database takes: its pages as a reader sees them now (the online backup copies those).

    Not its file and its write-ahead log: a WAL file keeps the size it once grew to (while a long
    read held back checkpoints, say) long after its frames were copied back, and a backup that
    fitted was refused for want of room for it. The file sizes only if the database does not open.
    """
    try:
        with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
            pages = int(db.execute("PRAGMA page_count").fetchone()[0])
            return pages * int(db.execute("PRAGMA page_size").fetchone()[0])
    except sqlite3.Error:
        return sum(Path(f"{database}{suffix}").stat().st_size for suffix in ("", "-wal") if Path(f"{database}{suffix}").exists())


def _check_room(directory: Path, size: int, what: str, consequence: str) -> None:
    """FailedPrecondition unless directory's file system has room for a database of size bytes while it is checked.

    A full disk otherwise shows up as SQLite's 'database or disk is full', or as a 'disk I/O
    error' while the copy is checked, which reads as a damaged database.
    """
    usage = os.statvfs(directory)
    free = (usage.f_bfree if os.geteuid() == 0 else usage.f_bavail) * usage.f_frsize  # root may use the reserved blocks
    needed = size + _CHECK_ROOM
    if free < needed:
        raise FailedPrecondition(
            f"{directory} has {free} bytes free, and {what} needs about {needed}: make room there or choose another place; {consequence}"
        )


def backup(store_url: str, out: Path, audit_public_key_pem: bytes) -> BackupSummary:
    """Copy the live database to out (mode 0600) as of one transaction, check the copy, then keep it."""
    source = sqlite_file(store_url)
    if not source.exists():
        raise FailedPrecondition(f"no database at {source}; nothing to back up")
    check_destination(out, source)
    _remove_abandoned_partials(out)
    # This process's own: a second backup to the same file at the same time (cron and a person) neither
    # removes this one's partial copy nor is overwritten by it (see _keep).
    partial = out.with_name(f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.partial")
    os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    try:
        # Opened read-write but only read: a read-only open of a WAL database fails without its -shm file.
        with contextlib.closing(sqlite3.connect(source, timeout=30)) as live, contextlib.closing(sqlite3.connect(partial)) as copy:
            live.backup(copy)  # all pages in one step: one read transaction, one consistent snapshot
        summary = _check_copy(partial, audit_public_key_pem)
        _make_self_contained(partial)
        fsync_path(partial)
        _keep(partial, out)
        fsync_path(out.parent)
    except FailedPrecondition:
        _remove_with_companions(partial)
        raise
    except (sqlite3.Error, OSError) as exc:  # the disk filled up meanwhile, say
        _remove_with_companions(partial)
        raise FailedPrecondition(f"could not write the backup {out}: {exc}; nothing was kept") from None
    except BaseException:
        _remove_with_companions(partial)
        raise
    return dataclasses.replace(summary, path=out, sha256=_sha256(out))


def _check_copy(path: Path, audit_public_key_pem: bytes) -> BackupSummary:
    """Integrity, schema, audit chain and the tables against it of a database file; FailedPrecondition naming the first problem.

    Only ever run on a working copy: opening it as a store switches it to WAL mode. Its
    checksum is left empty: the caller takes that of the file it keeps or was given.
    """
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            result = db.execute("PRAGMA integrity_check").fetchone()
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as exc:
        raise FailedPrecondition(f"{path} is not a usable SQLite database: {exc}") from None
    if result is None or result[0] != "ok":
        raise FailedPrecondition(f"{path} fails SQLite's integrity check: {result[0] if result else 'no answer'}")
    if not {"schema_migrations", "certificates", "revocations", "crls", "audit_events"} <= tables:
        raise FailedPrecondition(f"{path} is not a ca-daemon database (no certificates or audit_events table)")
    store = open_store(f"sqlite:///{path}", migrate=False)
    try:
        version = store.schema_version()
        if (reason := schema.unknown_version_reason(version)) is not None:
            raise FailedPrecondition(f"{path}: {reason}")
        report = audit.verify(audit.live_records(store), audit_public_key_pem)
        # The chain vouches for the events only: a revocation row deleted from a copy would come off the next CRL.
        rows = audit.Report()
        if report.ok:
            audit.reconcile(store, rows)
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            issued = int(db.execute("SELECT count(*) FROM certificates").fetchone()[0])
            revoked = int(db.execute("SELECT count(*) FROM revocations").fetchone()[0])
    finally:
        store.close()
        with contextlib.suppress(OSError):
            Path(f"{path}.writelock").unlink()
    if not report.ok:
        raise FailedPrecondition(f"{path}: the audit log does not verify: {report.summary()}")
    if not report.checkpoints:
        raise FailedPrecondition(
            f"{path}: its audit log holds no checkpoint signed by this CA's audit key ([audit] key), which `db backup` "
            "signs before every copy: a copy of another CA's database, or a file `db backup` did not write"
        )
    if not rows.ok:
        raise FailedPrecondition(
            f"{path}: its certificates or revocations tables disagree with its audit log (as `audit verify --live` "
            f"reports them): {rows.summary()}"
        )
    return BackupSummary(path, "", version, issued, revoked, report)


def restore(
    backup_path: Path, store_url: str, audit_public_key_pem: bytes, *, accept_loss: bool = False, crl_directory: Path | None = None
) -> RestoreSummary:
    """Put a checked backup in place of the store's database; the caller holds the state directory's lock (daemon stopped).

    The database in place (if any) is moved aside with its WAL, never deleted. If it can
    still be read and holds what the backup lacks (see Loss), the restore is refused unless
    accept_loss: restoring would forget it. So it is when the CRL files the daemon wrote to
    crl_directory (`[crl] directory`) list revocations the backup lacks or are numbered above
    its CRLs: they outlive a database in place that no longer reads, the usual reason to restore.
    """
    target = sqlite_file(store_url)
    if not backup_path.is_file():
        raise FailedPrecondition(f"{backup_path} is not a file")
    working = target.with_name(target.name + ".restoring")
    _remove_with_companions(working)
    _check_room(target.parent, backup_path.stat().st_size, f"restoring {backup_path}", "Nothing was changed")
    os.close(os.open(working, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    try:
        data = backup_path.read_bytes()  # the backup file itself is never opened for writing
        digest = hashlib.sha256(data).hexdigest()  # of the bytes restored
        working.write_bytes(data)
        summary = _check_copy(working, audit_public_key_pem)
        with contextlib.closing(sqlite3.connect(working)) as db:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        fsync_path(working)
    except (sqlite3.Error, OSError) as exc:  # the disk filled up meanwhile, say
        _remove_with_companions(working)
        raise FailedPrecondition(f"could not write the working copy {working}: {exc}. Nothing was changed") from None
    except BaseException:
        _remove_with_companions(working)
        raise
    moved: Path | None = None
    try:
        lost, unread = _lost_by_restoring(target, working, digest) if target.exists() else (Loss(), "")
        lost = lost.merged(_lost_by_published_crls(working, crl_directory))
    except BaseException:
        _remove_with_companions(working)
        raise
    if lost and not accept_loss:
        _remove_with_companions(working)
        if unread:
            where = (
                f"the database in place ({target}) could not be read ({unread}), and the CRL files this CA published "
                f"({crl_directory}) show what the backup lacks"
            )
        else:
            where = f"the database in place ({target}) and the CRL files this CA published hold what the backup lacks"
        raise FailedPrecondition(
            f"{where}: {lost.describe()}. Nothing was changed. If the backup is nonetheless the one to restore, rerun with --accept-loss"
        )
    # Whose the database is: the daemon runs as its own user, the operator restores as root (deploy/README.md).
    _own_like(working, (target if target.exists() else target.parent).stat())
    if target.exists():
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        moved = target.with_name(f"{target.name}.before-restore-{stamp}")
        for suffix in ("", "-wal", "-shm"):
            if Path(f"{target}{suffix}").exists():
                Path(f"{target}{suffix}").replace(f"{moved}{suffix}")
    for suffix in ("-wal", "-shm"):
        if Path(f"{working}{suffix}").exists():
            Path(f"{working}{suffix}").replace(f"{target}{suffix}")
    working.replace(target)
    fsync_path(target.parent)
    return RestoreSummary(dataclasses.replace(summary, path=backup_path, sha256=digest), moved, lost, unread)


def _lost_by_restoring(current: Path, restored: Path, backup_sha256: str) -> tuple[Loss, str]:
    """What current holds that restored lacks; nothing, and why, when current cannot be read (the usual reason to restore).

    CA keys by their whole record (status, public key, certificate, chain): restoring an
    older one makes its signing key sign again. Revocations are compared row by row (reason, dates, lift, change_seq), not by each
    issuer's highest change_seq: the database in place may itself descend from an older
    restore, so its counter can be at or below the backup's while its rows differ, and
    the rows name the certificates. Audit events by (seq, hash): the chain links each
    event to all before it, so what differs is one run from the first lost seq to the
    head. A checkpoint is lost when the restored log has no event of its seq and head hash.
    """
    try:
        with contextlib.closing(sqlite3.connect(current, timeout=30)) as db:
            db.execute("ATTACH DATABASE ? AS restored", (str(restored),))
            certificate_serials = _column(
                db, "SELECT serial FROM main.certificates WHERE serial NOT IN (SELECT serial FROM restored.certificates)"
            )
            revocation_serials = _column(
                db,
                "SELECT serial FROM main.revocations WHERE lifted_at IS NULL AND serial NOT IN "
                "(SELECT serial FROM restored.revocations WHERE lifted_at IS NULL)",
            )
            changed = _column(
                db,
                "SELECT m.serial FROM main.revocations AS m WHERE NOT EXISTS (SELECT 1 FROM restored.revocations AS r "
                "WHERE r.serial = m.serial AND r.reason IS m.reason AND r.revoked_at IS m.revoked_at "
                "AND r.invalidity_date IS m.invalidity_date AND r.lifted_at IS m.lifted_at AND r.change_seq IS m.change_seq)",
            )
            crl_numbers = db.execute(
                "SELECT c.issuer_key_id, coalesce(r.top, 0), c.top FROM "
                "(SELECT issuer_key_id, max(crl_number) AS top FROM main.crls GROUP BY issuer_key_id) AS c "
                "LEFT JOIN (SELECT issuer_key_id, max(crl_number) AS top FROM restored.crls GROUP BY issuer_key_id) AS r "
                "ON r.issuer_key_id = c.issuer_key_id WHERE c.top > coalesce(r.top, 0) ORDER BY c.issuer_key_id"
            ).fetchall()
            mtls_certificate_serials = _column(
                db, "SELECT serial FROM main.mtls_certificates WHERE serial NOT IN (SELECT serial FROM restored.mtls_certificates)"
            )
            mtls_revocation_serials = _column(
                db,
                "SELECT m.serial FROM main.mtls_certificates AS m WHERE m.revoked_at IS NOT NULL AND NOT EXISTS "
                "(SELECT 1 FROM restored.mtls_certificates AS r WHERE r.serial = m.serial "
                "AND r.revoked_at IS m.revoked_at AND r.revocation_reason IS m.revocation_reason)",
            )
            ca_keys = db.execute(
                "SELECT m.key_id, coalesce(r.status, 'absent'), m.status FROM main.ca_keys AS m "
                "LEFT JOIN restored.ca_keys AS r ON r.key_id = m.key_id WHERE r.key_id IS NULL OR r.status IS NOT m.status "
                "OR r.public_key_der IS NOT m.public_key_der OR r.certificate_der IS NOT m.certificate_der "
                "OR r.chain_der IS NOT m.chain_der ORDER BY m.key_id"
            ).fetchall()
            audit_loss = _audit_lost(db, backup_sha256)
    except sqlite3.DatabaseError as exc:
        return Loss(), str(exc) or type(exc).__name__
    loss = Loss(
        certificate_serials,
        revocation_serials,
        tuple(sorted(set(changed) - set(revocation_serials))),
        tuple((str(i), int(r), int(c)) for i, r, c in crl_numbers),
        mtls_certificate_serials,
        mtls_revocation_serials,
        tuple((str(k), str(then), str(current)) for k, then, current in ca_keys),
        audit_loss,
    )
    return loss, ""


def _lost_by_published_crls(restored: Path, crl_directory: Path | None) -> Loss:
    """What the CRL files in crl_directory show that restored lacks: revocations in force and higher CRL numbers.

    Each file counts only if a CA key of restored signed it; per key, the CRLs are read in
    number order, a full CRL standing for all that came before and a delta adding entries
    (removeFromCRL taking one off), and only if one is numbered above every CRL restored
    holds of that key: files the backup already knew may lag it (a hold it records lifted
    stays on them until the next CRL) and show nothing it lacks. Any other file is named:
    a key made after the backup signed it, or it is no CRL at all.
    """
    files = sorted(crl_directory.glob("*.crl")) if crl_directory is not None and crl_directory.is_dir() else []
    if not files:
        return Loss()
    with contextlib.closing(sqlite3.connect(restored)) as db:
        keys = [(str(key_id), bytes(der)) for key_id, der in db.execute("SELECT key_id, public_key_der FROM ca_keys ORDER BY key_id")]
        tops = {str(i): int(n) for i, n in db.execute("SELECT issuer_key_id, max(crl_number) FROM crls GROUP BY issuer_key_id")}
        if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'crl_number_floors'").fetchone():
            for issuer, floor in db.execute("SELECT issuer_key_id, floor FROM crl_number_floors"):
                tops[str(issuer)] = max(tops.get(str(issuer), 0), int(floor))
        in_force = {str(serial) for (serial,) in db.execute("SELECT serial FROM revocations WHERE lifted_at IS NULL")}
        issued = {str(serial) for (serial,) in db.execute("SELECT serial FROM certificates")}
    public_keys: dict[str, PublicKeyTypes] = {}
    for key_id, der in keys:
        with contextlib.suppress(ValueError, UnsupportedAlgorithm):
            public_keys[key_id] = serialization.load_der_public_key(der)
    unverified: list[str] = []
    by_issuer: dict[str, list[tuple[int, x509.CertificateRevocationList]]] = {}
    for path in files:
        try:
            crl = x509.load_der_x509_crl(path.read_bytes())
        except (OSError, ValueError):
            unverified.append(path.name)
            continue
        issuer = next((key_id for key_id, key in public_keys.items() if _signed_by(crl, key)), None)
        if issuer is None:
            unverified.append(path.name)
            continue
        by_issuer.setdefault(issuer, []).append((crl_number(crl), crl))
    crl_numbers: list[tuple[str, int, int]] = []
    listed: set[str] = set()
    for issuer, published in sorted(by_issuer.items()):
        published.sort(key=lambda numbered: numbered[0])
        if published[-1][0] <= tops.get(issuer, 0):
            # The backup holds a CRL at least this new: it knew all these files show, and what changed after them
            # (a hold lifted before the next CRL, a loss an earlier --accept-loss restore accepted) is its own to keep.
            continue
        crl_numbers.append((issuer, tops.get(issuer, 0), published[-1][0]))
        revoked: set[int] = set()
        for _, crl in published:
            if delta_base(crl) is None:
                revoked = set()
            for entry in crl:
                if _entry_reason(entry) == x509.ReasonFlags.remove_from_crl:
                    revoked.discard(entry.serial_number)
                else:
                    revoked.add(entry.serial_number)
        listed |= {serial_hex(serial) for serial in revoked}
    return Loss(
        certificate_serials=tuple(sorted(listed - issued)),
        revocation_serials=tuple(sorted(listed - in_force)),
        crl_numbers=tuple(crl_numbers),
        unverified_crl_files=tuple(unverified),
    )


def _signed_by(crl: x509.CertificateRevocationList, key: PublicKeyTypes) -> bool:
    try:
        return crl.is_signature_valid(key)  # type: ignore[arg-type]
    except (TypeError, ValueError, UnsupportedAlgorithm):
        return False


def _entry_reason(entry: x509.RevokedCertificate) -> x509.ReasonFlags | None:
    try:
        return entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    except x509.ExtensionNotFound:
        return None


def _audit_lost(db: sqlite3.Connection, backup_sha256: str) -> AuditLoss:
    """Audit events and checkpoints of main that restored lacks (restored attached to db).

    `db backup` records its own `db.backup` event after the copy, so the log in place always
    has it beyond the backup, and a daemon that served during the backup signs a checkpoint
    of it when it stops (or at its next interval). If that event (naming this backup's
    SHA-256), with checkpoints whose head is that very event, is all there is, nothing is
    lost: the restore's own event records the file, and the event and its checkpoint vouch
    for nothing but the copy. Anything more counts whole.
    """
    # Time and action too, for events written with audit.chain = false (no hash).
    events = db.execute(
        "SELECT m.seq, m.hash, m.action = 'db.backup' AND instr(m.details, ?) > 0 FROM main.audit_events AS m "
        "WHERE NOT EXISTS (SELECT 1 FROM restored.audit_events AS r WHERE r.seq = m.seq AND r.hash IS m.hash "
        "AND r.time IS m.time AND r.action IS m.action) ORDER BY m.seq",
        (backup_sha256,),
    ).fetchall()
    lost_checkpoints = db.execute(
        "SELECT c.seq, c.head_hash FROM main.audit_checkpoints AS c WHERE NOT EXISTS "
        "(SELECT 1 FROM restored.audit_events AS r WHERE r.seq = c.seq AND r.hash = c.head_hash) ORDER BY c.seq"
    ).fetchall()
    checkpoints = [int(seq) for seq, _ in lost_checkpoints]
    backup_events = {(int(seq), bytes(digest)) for seq, digest, exempt in events if exempt and digest is not None}
    if all(exempt for _, _, exempt in events) and all((int(s), bytes(h)) in backup_events for s, h in lost_checkpoints):
        return AuditLoss()
    return AuditLoss(
        events=len(events),
        first_seq=int(events[0][0]) if events else 0,
        last_seq=int(events[-1][0]) if events else 0,
        head_hash=bytes(events[-1][1]).hex() if events and events[-1][1] is not None else "",
        checkpoints=len(checkpoints),
        last_checkpoint_seq=checkpoints[-1] if checkpoints else 0,
    )


def _column(db: sqlite3.Connection, query: str) -> tuple[str, ...]:
    return tuple(sorted(str(row[0]) for row in db.execute(query)))


def _make_self_contained(path: Path) -> None:
    """One file, no WAL: the copy can be moved, checksummed and restored on its own."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA journal_mode=DELETE")
    for suffix in _COMPANIONS:
        with contextlib.suppress(OSError):
            Path(f"{path}{suffix}").unlink()


def _own_like(database: Path, owner: os.stat_result) -> None:
    """Run as root, give database and its WAL files owner's user and group.

    A root-owned database of mode 0600 in place of the service user's: the daemon could not
    open it and did not start after the restore.
    """
    if os.geteuid() != 0:
        return
    for suffix in ("", "-wal", "-shm"):
        if Path(f"{database}{suffix}").exists():
            os.chown(f"{database}{suffix}", owner.st_uid, owner.st_gid)


def _keep(partial: Path, out: Path) -> None:
    """Give the checked copy its name, unless a file took that name since check_destination: never overwrite one.

    A hard link fails if the name exists, where a rename would replace it; a file system without
    hard links gets the rename after one more look.
    """
    taken = f"{out} was created while this backup was taken (another backup to it?); nothing was kept"
    try:
        os.link(partial, out)
    except FileExistsError:
        raise FailedPrecondition(taken) from None
    except OSError:
        if out.exists():
            raise FailedPrecondition(taken) from None
        partial.replace(out)
        return
    partial.unlink()


def _remove_abandoned_partials(out: Path) -> None:
    """Remove the partial copies of backups to out whose process is gone (killed mid-copy); a running one's stays."""
    for partial in out.parent.glob(f".{out.name}.*.partial"):
        pid = partial.name.removeprefix(f".{out.name}.").split(".", 1)[0]
        if pid.isdigit() and not _running(int(pid)):
            _remove_with_companions(partial)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove_with_companions(path: Path) -> None:
    for suffix in ("", *_COMPANIONS):
        with contextlib.suppress(OSError):
            Path(f"{path}{suffix}").unlink()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as data:
        while chunk := data.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


__all__ = ["AuditLoss", "BackupSummary", "Loss", "RestoreSummary", "backup", "restore", "sqlite_file"]
