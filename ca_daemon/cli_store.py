"""`ca-daemon db backup` and `ca-daemon db restore`: the embedded store's backups (see backup.py).

Same layer as cli.py.
"""

from __future__ import annotations

import argparse
import os
from datetime import UTC, datetime
from pathlib import Path

from ca_daemon import app, audit, backup
from ca_daemon import config as config_module
from ca_daemon.cli_access import operator_actor
from ca_daemon.errors import ConfigError, FailedPrecondition, NotFound
from ca_daemon.model import AuditEvent
from ca_daemon.store import SqlStore


def add_commands(db: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = db.add_parser("backup", help="a consistent copy of the SQLite store, taken while the daemon serves; kept only once it checks out")
    p.add_argument("--out", required=True, help="the backup file to write (never overwritten; mode 0600)")
    p.set_defaults(handler=_backup)
    p = db.add_parser("restore", help="with the daemon stopped: put a checked backup in place; the current database is moved aside")
    p.add_argument("--from", dest="source", required=True, help="a file written by `ca-daemon db backup`")
    p.add_argument(
        "--accept-loss",
        action="store_true",
        help=(
            "restore even though the database in place holds certificates, revocations, CRL numbers, mTLS client "
            "certificates or revocations, or audit events the backup lacks, or the published CRL files list revocations "
            "or CRL numbers it lacks"
        ),
    )
    p.set_defaults(handler=_restore)


def raise_crl_number(config_path: str, issuer: str, above: int) -> int:
    """`ca-daemon crl raise-number`: for a restore whose previous database is lost, from the newest published CRL."""
    if above < 1:
        raise ConfigError("--above must be a positive CRL number")
    config = config_module.load(config_path)
    store = app.connect_store(config)
    try:
        if store.get_ca_key(issuer) is None:
            raise NotFound(f"no CA key {issuer!r}; `ca-daemon key list` shows the keys")
        floor = _raise_floor(store, issuer, above, "set by an operator")
    finally:
        store.close()
    print(f"the next CRL of {issuer} will be numbered above {floor}")
    return 0


def _raise_floor(store: SqlStore, issuer: str, above: int, reason: str) -> int:
    event = _operator_event("crl.number-floor", "raised", key_id=issuer, reason=reason, details={"above": str(above)})
    return store.raise_crl_number_floor(issuer, above, event)


def _operator_event(action: str, outcome: str, *, key_id: str = "", reason: str = "", details: dict[str, str]) -> AuditEvent:
    return AuditEvent(
        time=datetime.now(UTC), actor=operator_actor(), action=action, outcome=outcome, key_id=key_id, reason=reason, details=details
    )


def _audit_public_key(config: config_module.Config) -> bytes:
    """The key that verifies the audit checkpoints in a copy: read from the token, as `audit public-key` does."""
    hsm = app.connect_hsm(config)
    try:
        return audit.audit_public_key_pem(hsm, config.audit.key_uri)
    finally:
        hsm.close()


def _backup(args: argparse.Namespace) -> int:
    """Sign a checkpoint of the log's head first, so that the copy's log is covered by a signature up to there."""
    config = config_module.load(args.config)
    backup.sqlite_file(config.store.url)  # PostgreSQL: refused before the token is opened
    backup.check_destination(Path(args.out).resolve(), backup.sqlite_file(config.store.url))  # so is a backup with nowhere to go
    with app.connected(config) as (hsm, store):
        audit.Checkpointer(hsm, store, config.audit.key_uri).checkpoint()
        summary = backup.backup(config.store.url, Path(args.out).resolve(), audit.audit_public_key_pem(hsm, config.audit.key_uri))
        details = {"path": str(summary.path), "sha256": summary.sha256, "certificates": str(summary.certificates)}
        store.append_audit([_operator_event("db.backup", "written", details=details)])
    print(f"wrote {summary.describe()}")
    return 0


def _restore(args: argparse.Namespace) -> int:
    config = config_module.load(args.config)
    backup.sqlite_file(config.store.url)  # PostgreSQL: refused before the token is opened
    lock = app.try_lock_state_directory(config.state_dir)  # the daemon holds it while it runs
    if lock is None:
        raise FailedPrecondition(f"a ca-daemon is running on {config.state_dir}; stop it before restoring")
    try:
        return _restore_stopped(args, config)
    finally:
        os.close(lock)


# Serials a db.restore event lists at most (the output lists them all).
_LISTED_IN_EVENT = 1000


def _restore_stopped(args: argparse.Namespace, config: config_module.Config) -> int:
    outcome = backup.restore(
        Path(args.source).resolve(),
        config.store.url,
        _audit_public_key(config),
        accept_loss=args.accept_loss,
        crl_directory=config.crl.directory,
    )
    print(f"restored {outcome.restored.describe()}")
    if outcome.moved_aside is not None:
        print(f"the previous database is kept at {outcome.moved_aside}")
    if outcome.unread:
        print(
            f"the previous database could not be read ({outcome.unread}): only the CRL files in {config.crl.directory} "
            "were compared with the backup"
        )
    if outcome.lost:
        print(f"WARNING: forgotten by this restore (--accept-loss): {outcome.lost.describe()}")
        for key_id, in_backup, in_place in outcome.lost.ca_keys:
            print(f"  CA key {key_id} back to the backup's record: {in_backup} (was {in_place})")
        if outcome.lost.certificate_serials:
            print(f"  certificates no longer known: {', '.join(outcome.lost.certificate_serials)}")
        if outcome.lost.revocation_serials:
            print(f"  certificates no longer revoked (revoke them again): {', '.join(outcome.lost.revocation_serials)}")
        if outcome.lost.mtls_certificate_serials:
            print(f"  mTLS client certificates no longer known: {', '.join(outcome.lost.mtls_certificate_serials)}")
        if outcome.lost.mtls_revocation_serials:
            print(f"  mTLS clients no longer revoked: {', '.join(outcome.lost.mtls_revocation_serials)}")
        if outcome.lost.revocation_changes:
            print(f"  revocations back to the backup's state: {', '.join(outcome.lost.revocation_changes)}")
        if outcome.lost.unverified_crl_files:
            print(f"  CRL files no CA key of the backup signed: {', '.join(outcome.lost.unverified_crl_files)}")
    print(
        "before relying parties see a new CRL, check that its number will be above every one they have seen "
        "(deploy/README.md, Backup and restore)"
    )
    # Recorded in the restored log: who put it in place, and from what.
    store = app.connect_store(config)
    try:
        for issuer, _, current in outcome.lost.crl_numbers:
            _raise_floor(store, issuer, current, "restore from an older backup")
            print(f"the next CRL of {issuer} will be numbered above {current}, the highest the previous database published")
        details = {
            "from": str(outcome.restored.path),
            "sha256": outcome.restored.sha256,
            "previous": str(outcome.moved_aside or ""),
            "lost": outcome.lost.describe(),
            # The certificates valid again by this restore, for whoever must revoke them again (bounded: the count is in "lost").
            "no_longer_revoked": ",".join(outcome.lost.revocation_serials[:_LISTED_IN_EVENT]),
            **_audit_loss_details(outcome.lost.audit),
        }
        store.append_audit([_operator_event("db.restore", "restored", details=details)])
    finally:
        store.close()
    return 0


def _audit_loss_details(lost: backup.AuditLoss) -> dict[str, str]:
    """For the db.restore event: which seqs this log reuses, and what an auditor's copies may hold beyond the backup."""
    if not lost:
        return {}
    return {
        "lost_audit_events": str(lost.events),
        "lost_audit_first_seq": str(lost.first_seq),
        "lost_audit_last_seq": str(lost.last_seq),
        "lost_audit_head_hash": lost.head_hash,
        "lost_checkpoints": str(lost.checkpoints),
        "lost_last_checkpoint_seq": str(lost.last_checkpoint_seq),
    }


__all__ = ["add_commands"]
