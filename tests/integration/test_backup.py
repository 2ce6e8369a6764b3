"""Backups of the SQLite store: taken while Sign calls commit, checked, and restored with the daemon stopped.

Real daemon, real token, real SQLite; the copies are read with Python's sqlite3 and the
daemon's own CLI (`audit verify --live`) after the restore.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sqlite3
import stat
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509

from ca_daemon import app, audit
from ca_daemon import backup as backup_module
from ca_daemon import config as config_module
from ca_daemon._proto.ca_daemon.v1 import ca_pb2
from ca_daemon.errors import FailedPrecondition
from tests.conftest import CaEnv, Daemon, at_once, free_port, make_env, mounted_tmpfs
from tests.integration.crl_helpers import sign, stub, wait_for_crl

pytestmark = pytest.mark.slow


def database(env: CaEnv) -> Path:
    return Path(config_module.load(env.config_path).store.url.removeprefix("sqlite:///"))


def serials_in(path: Path) -> set[str]:
    with sqlite3.connect(path) as db:
        return {row[0] for row in db.execute("SELECT serial FROM certificates")}


def audit_actions(path: Path) -> list[str]:
    with sqlite3.connect(path) as db:
        return [row[0] for row in db.execute("SELECT action FROM audit_events ORDER BY seq")]


def max_crl_number(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute("SELECT max(crl_number) FROM crls").fetchone()[0] or 0)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cert_serial(path: Path) -> str:
    return format(x509.load_pem_x509_certificate(path.read_bytes()).serial_number, "x")


def query(path: Path, sql: str, *args: object) -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as db:
        return [tuple(row) for row in db.execute(sql, args)]


def _revoked_while_serving(env: CaEnv, reason: int, log_name: str = "daemon.log", serial: str = "") -> str:
    """Start the daemon, issue a certificate (unless serial names one), revoke it for reason, stop it; the serial."""
    daemon = Daemon(env, env.state_dir / log_name).start()
    try:
        with grpc.insecure_channel(env.target) as channel:
            serial = serial or sign(channel).serial
            stub(channel).Revoke(ca_pb2.RevokeRequest(serial=serial, reason=reason), timeout=10)  # type: ignore[arg-type]
    finally:
        daemon.stop()
    return serial


def test_a_backup_taken_while_signing_holds_every_answered_certificate_and_restores(
    tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path
) -> None:
    env = make_env(tmp_path_factory.mktemp("backup"), softhsm_conf)
    daemon = Daemon(env, env.state_dir / "daemon.log").start()
    out = tmp_path_factory.mktemp("backups") / "ca-backup.db"
    answered: list[str] = []
    answered_before_backup: list[str] = []
    stop = threading.Event()

    def keep_signing() -> None:
        with grpc.insecure_channel(env.target) as channel:
            while not stop.is_set():
                answered.append(sign(channel).serial)

    try:
        signer = threading.Thread(target=keep_signing)
        signer.start()
        while len(answered) < 20:
            assert signer.is_alive()
            stop.wait(0.05)
        answered_before_backup = list(answered)
        result = env.cli("db", "backup", "--out", str(out))
        while len(answered) < len(answered_before_backup) + 20:  # more issued after the copy
            stop.wait(0.05)
        stop.set()
        signer.join()

        # The copy: every certificate answered before the backup began, in one self-contained 0600 file.
        in_backup = serials_in(out)
        assert set(answered_before_backup) <= in_backup
        assert stat.S_IMODE(out.stat().st_mode) == 0o600
        with sqlite3.connect(out) as db:
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert not list(out.parent.glob("*-wal")) and not list(out.parent.glob("*.partial"))
        assert sha256(out) in result.stdout and "audit log OK" in result.stdout, result.stdout
        assert "db.backup" in audit_actions(database(env))  # recorded in the live log

        with grpc.insecure_channel(env.target) as channel:  # a revocation after the copy, and the CRL it brings
            stub(channel).Revoke(
                ca_pb2.RevokeRequest(serial=answered_before_backup[1], reason=ca_pb2.REVOCATION_REASON_KEY_COMPROMISE), timeout=10
            )
            wait_for_crl(channel, lambda crl: int(answered_before_backup[1], 16) in {e.serial_number for e in crl})

        refused = env.cli("db", "restore", "--from", str(out), check=False)
        assert refused.returncode != 0 and "stop it before restoring" in refused.stderr, refused.stderr
    finally:
        stop.set()
        daemon.stop()

    live = database(env)
    issued_after = serials_in(live) - in_backup
    assert issued_after  # the stream went on after the copy
    backup_digest, live_before = sha256(out), (serials_in(live), audit_actions(live))
    highest_crl = max_crl_number(live)
    # The database in place is readable and knows more than the backup: refused unless the loss is accepted.
    refused = env.cli("db", "restore", "--from", str(out), check=False)
    assert refused.returncode != 0, refused.stdout
    assert f"{len(issued_after)} certificate(s)" in refused.stderr and "1 revocation(s)" in refused.stderr, refused.stderr
    assert "CRLs of ca-root-1 numbered up to" in refused.stderr and "--accept-loss" in refused.stderr, refused.stderr
    assert (serials_in(live), audit_actions(live)) == live_before and not list(live.parent.glob("*.restoring*"))
    restored = env.cli("db", "restore", "--from", str(out), "--accept-loss")
    assert "forgotten by this restore" in restored.stdout and sorted(issued_after)[0] in restored.stdout, restored.stdout
    # The certificate revoked after the copy is valid again: named, so that the operator can revoke it again.
    revoked_after = answered_before_backup[1]
    assert f"certificates no longer revoked (revoke them again): {revoked_after}" in restored.stdout, restored.stdout
    assert sha256(out) == backup_digest  # the backup file itself is never written to
    assert f"the next CRL of ca-root-1 will be numbered above {highest_crl}" in restored.stdout, restored.stdout
    assert max_crl_number(live) < highest_crl  # the backup's own CRLs are older
    moved = list(live.parent.glob(live.name + ".before-restore-*"))
    assert [p for p in moved if not p.name.endswith(("-wal", "-shm"))], "the previous database was not kept"
    assert serials_in(live) == in_backup
    assert audit_actions(live)[-1] == "db.restore"
    with sqlite3.connect(live) as db:
        (details,) = db.execute("SELECT details FROM audit_events WHERE action = 'db.restore'").fetchone()
    assert json.loads(details)["no_longer_revoked"] == revoked_after

    daemon = Daemon(env, env.state_dir / "daemon-restored.log").start()
    try:
        with grpc.insecure_channel(env.target) as channel:
            kept = stub(channel).GetCertificate(ca_pb2.GetCertificateRequest(serial=answered_before_backup[0]), timeout=10)
            assert kept.serial == answered_before_backup[0]
            with pytest.raises(grpc.RpcError) as lost:
                stub(channel).GetCertificate(ca_pb2.GetCertificateRequest(serial=sorted(issued_after)[0]), timeout=10)
            assert lost.value.code() == grpc.StatusCode.NOT_FOUND
            sign(channel)  # the restored store issues again, its audit chain continuing the backup's
            # CRL numbers go on above what relying parties may have seen from the previous database.
            stub(channel).Revoke(ca_pb2.RevokeRequest(serial=kept.serial), timeout=10)
            assert wait_for_crl(channel, lambda crl: int(kept.serial, 16) in {e.serial_number for e in crl}).crl_number > highest_crl
    finally:
        daemon.stop()
    public_key = env.state_dir / "audit.pem"
    env.cli("audit", "public-key", "--out", str(public_key))
    verified = env.cli("audit", "verify", "--public-key", str(public_key), "--live")
    assert verified.stdout.startswith("OK"), verified.stdout


def test_a_tampered_backup_is_refused_and_the_database_in_place_is_untouched(
    tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path
) -> None:
    env = make_env(tmp_path_factory.mktemp("tamper"), softhsm_conf)
    daemon = Daemon(env, env.state_dir / "daemon.log").start()
    try:
        with grpc.insecure_channel(env.target) as channel:
            for _ in range(3):
                sign(channel)
    finally:
        daemon.stop()
    backups = tmp_path_factory.mktemp("tampered")
    good = backups / "good.db"
    env.cli("db", "backup", "--out", str(good))
    again = env.cli("db", "backup", "--out", str(good), check=False)
    assert again.returncode != 0 and "never overwrites" in again.stderr, again.stderr

    tampered = backups / "tampered.db"
    tampered.write_bytes(good.read_bytes())
    with sqlite3.connect(tampered) as db:
        db.execute("UPDATE audit_events SET actor = 'someone-else' WHERE seq = (SELECT max(seq) FROM audit_events)")
    live = database(env)
    before = sha256(live)
    refused = env.cli("db", "restore", "--from", str(tampered), check=False)
    assert refused.returncode != 0 and "the audit log does not verify" in refused.stderr, refused.stderr
    assert sha256(live) == before
    assert not list(live.parent.glob("*.restoring*")) and not list(live.parent.glob("*.before-restore-*"))

    # The previous database is lost: the operator sets the floor from the newest CRL relying parties saw.
    highest = max_crl_number(live)
    assert "numbered above 1000" in env.cli("crl", "raise-number", "--issuer", "ca-root-1", "--above", "1000").stdout
    assert "numbered above 1000" in env.cli("crl", "raise-number", "--issuer", "ca-root-1", "--above", str(highest)).stdout
    assert "published full CRL 1001 of ca-root-1" in env.cli("crl", "publish").stdout
    unknown = env.cli("crl", "raise-number", "--issuer", "no-such-key", "--above", "5", check=False)
    assert unknown.returncode != 0 and "no CA key 'no-such-key'" in unknown.stderr, unknown.stderr
    before = sha256(live)

    not_a_database = backups / "notes.txt"
    not_a_database.write_text("not a database\n")
    refused = env.cli("db", "restore", "--from", str(not_a_database), check=False)
    assert refused.returncode != 0 and "not a usable SQLite database" in refused.stderr, refused.stderr
    assert sha256(live) == before


def test_postgresql_stores_are_pointed_at_their_own_tools(tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path) -> None:
    env = make_env(tmp_path_factory.mktemp("pg"), softhsm_conf, init=False)
    text = env.config_path.read_text()
    start = text.index('url = "sqlite:///')
    end = text.index("\n", start)
    env.config_path.write_text(text[:start] + 'url = "postgresql://ca@127.0.0.1:5432/ca"' + text[end:])
    result = env.cli("db", "backup", "--out", str(env.state_dir / "b.db"), check=False)
    assert result.returncode != 0 and "pg_dump" in result.stderr, result.stderr
    assert not (env.state_dir / "b.db").exists()


def test_a_backup_into_a_missing_directory_is_refused_naming_it(tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path) -> None:
    env = make_env(tmp_path_factory.mktemp("nodir"), softhsm_conf)
    before = audit_actions(database(env))
    missing = env.state_dir / "backups"
    result = env.cli("db", "backup", "--out", str(missing / "ca.db"), check=False)
    assert result.returncode == 1, result.stderr
    assert result.stderr == f"ca-daemon: {missing} does not exist; create the directory the backup goes to first\n"
    assert not missing.exists() and audit_actions(database(env)) == before  # refused before the token: no checkpoint signed


def test_a_restore_that_would_forget_mtls_certificates_or_revocations_is_refused_naming_them(
    tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path
) -> None:
    env = make_env(tmp_path_factory.mktemp("mtlsrestore"), softhsm_conf)
    tls_dir = env.state_dir / "tls"
    env.cli("mtls", "init", "--out", str(tls_dir), "--client", "alice:admin", "--client", "bob:programmer")
    backup = tmp_path_factory.mktemp("mtlsbackups") / "ca.db"
    env.cli("db", "backup", "--out", str(backup))
    # After the backup: bob's (compromised) client certificate is revoked, a new admin client is issued.
    bob = cert_serial(tls_dir / "clients" / "bob.pem")
    env.cli("mtls", "revoke", "--serial", bob, "--crl-out", str(tls_dir / "client-ca.crl"))
    env.cli("mtls", "issue", "--out", str(tls_dir), "--client", "carol:admin")
    carol = cert_serial(tls_dir / "clients" / "carol.pem")
    live = database(env)
    mtls_rows = "SELECT serial, revoked_at FROM mtls_certificates ORDER BY serial"
    before = query(live, mtls_rows)

    refused = env.cli("db", "restore", "--from", str(backup), check=False)
    assert refused.returncode == 1, refused.stdout
    assert "1 mTLS client certificate(s) (`mtls revoke` could not revoke them" in refused.stderr, refused.stderr
    assert "1 mTLS revocation(s) (those clients would be let in again" in refused.stderr, refused.stderr
    assert "Nothing was changed" in refused.stderr and "--accept-loss" in refused.stderr, refused.stderr
    assert query(live, mtls_rows) == before and not list(live.parent.glob("*.before-restore-*"))

    restored = env.cli("db", "restore", "--from", str(backup), "--accept-loss")
    assert f"mTLS client certificates no longer known: {carol}" in restored.stdout, restored.stdout
    assert f"mTLS clients no longer revoked: {bob}" in restored.stdout, restored.stdout
    assert {serial for serial, _ in query(live, mtls_rows)} == {serial for serial, _ in before} - {carol}


def test_a_restore_that_would_drop_audit_events_and_checkpoints_is_refused_and_an_accepted_one_records_them(
    tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path
) -> None:
    env = make_env(tmp_path_factory.mktemp("auditrestore"), softhsm_conf)
    backup = tmp_path_factory.mktemp("auditbackups") / "ca.db"
    env.cli("db", "backup", "--out", str(backup))
    live = database(env)
    backup_head = int(query(backup, "SELECT max(seq) FROM audit_events")[0][0])
    # Only the backup's own db.backup event is beyond it: nothing is lost, the restore goes ahead.
    assert audit_actions(live)[backup_head:] == ["db.backup"]
    at_once = env.cli("db", "restore", "--from", str(backup))
    assert "forgotten" not in at_once.stdout, at_once.stdout
    assert audit_actions(live)[backup_head:] == ["db.restore"]

    env.cli("key", "generate", "--label", "ca-spare-1")  # an HSM key event after the backup
    env.cli("audit", "export", "--out", str(env.state_dir / "auditor.jsonl"), "--checkpoint")  # the auditor's signed copy
    head_seq, head_hash = query(live, "SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1")[0]
    checkpoint_seq = query(live, "SELECT max(seq) FROM audit_checkpoints")[0][0]
    assert checkpoint_seq == head_seq and len(audit_actions(live)) == head_seq
    before = audit_actions(live)

    refused = env.cli("db", "restore", "--from", str(backup), check=False)
    assert refused.returncode == 1, refused.stdout
    lost = f"{head_seq - backup_head} audit event(s), seq {backup_head + 1} to {head_seq} (new events would reuse those numbers)"
    assert lost in refused.stderr, refused.stderr
    assert f"1 signed audit checkpoint(s), the last at seq {checkpoint_seq}" in refused.stderr, refused.stderr
    # The key's record is named too, not only the audit events that mention it.
    assert "1 CA key change(s): ca-spare-1 pending (in the backup: absent)" in refused.stderr, refused.stderr
    assert "--accept-loss" in refused.stderr and audit_actions(live) == before

    restored = env.cli("db", "restore", "--from", str(backup), "--accept-loss")
    assert lost in restored.stdout, restored.stdout
    assert "CA key ca-spare-1 back to the backup's record: absent (was pending)" in restored.stdout, restored.stdout
    # The restore's own event, at the first reused seq, says which seqs were reused and what an auditor may hold.
    seq, details = query(live, "SELECT seq, details FROM audit_events WHERE action = 'db.restore'")[-1]
    recorded = json.loads(str(details))
    assert seq == backup_head + 1
    assert (recorded["lost_audit_first_seq"], recorded["lost_audit_last_seq"]) == (str(backup_head + 1), str(head_seq))
    assert recorded["lost_audit_head_hash"] == bytes(head_hash).hex()
    assert (recorded["lost_checkpoints"], recorded["lost_last_checkpoint_seq"]) == ("1", str(checkpoint_seq))
    public_key = env.state_dir / "audit.pem"
    env.cli("audit", "public-key", "--out", str(public_key))
    assert env.cli("audit", "verify", "--public-key", str(public_key), "--live").stdout.startswith("OK")


def test_a_backup_taken_while_serving_restores_after_the_daemon_stopped_without_accepting_a_loss(
    tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path
) -> None:
    """README, Backup and restore: `db backup` while the daemon serves, `db restore` once it is stopped.

    Stopping the daemon signs a checkpoint of the log's head, which is then the backup's own
    db.backup event; that checkpoint vouches for nothing the backup lacks either.
    """
    env = make_env(tmp_path_factory.mktemp("servingbackup"), softhsm_conf)
    backup = tmp_path_factory.mktemp("servingbackups") / "ca.db"
    daemon = Daemon(env, env.state_dir / "daemon.log").start()
    try:
        with grpc.insecure_channel(env.target) as channel:
            serial = sign(channel).serial
        env.cli("db", "backup", "--out", str(backup))
    finally:
        daemon.stop()
    live = database(env)
    backup_seq = query(live, "SELECT seq FROM audit_events WHERE action = 'db.backup'")[-1][0]
    assert query(live, "SELECT max(seq) FROM audit_events")[0][0] == backup_seq
    assert query(live, "SELECT max(seq) FROM audit_checkpoints")[0][0] == backup_seq  # signed as the daemon stopped

    restored = env.cli("db", "restore", "--from", str(backup), check=False)
    assert restored.returncode == 0, restored.stderr
    assert "forgotten" not in restored.stdout, restored.stdout
    assert serial in serials_in(live) and audit_actions(live)[backup_seq - 1 :] == ["db.restore"]
    public_key = env.state_dir / "audit.pem"
    env.cli("audit", "public-key", "--out", str(public_key))
    assert env.cli("audit", "verify", "--public-key", str(public_key), "--live").stdout.startswith("OK")

    # A checkpoint over anything more than the db.backup event still counts.
    env.cli("key", "generate", "--label", "ca-spare-1")
    env.cli("audit", "checkpoint")
    refused = env.cli("db", "restore", "--from", str(backup), check=False)
    assert refused.returncode == 1 and "signed audit checkpoint(s)" in refused.stderr, refused.stderr


def test_a_restore_that_would_turn_a_final_revocation_back_into_a_hold_is_refused(
    tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path
) -> None:
    env = make_env(tmp_path_factory.mktemp("holdrestore"), softhsm_conf)
    env.edit_config("127.0.0.1:8080", f"127.0.0.1:{free_port()}")
    env.edit_config("publish_on_revoke = true", "publish_on_revoke = false")
    serial = _revoked_while_serving(env, ca_pb2.REVOCATION_REASON_CERTIFICATE_HOLD, "daemon-1.log")
    backup = tmp_path_factory.mktemp("holdbackups") / "ca.db"
    env.cli("db", "backup", "--out", str(backup))
    _revoked_while_serving(env, ca_pb2.REVOCATION_REASON_KEY_COMPROMISE, "daemon-2.log", serial)  # acknowledged: durable
    live = database(env)
    reason = "SELECT reason FROM revocations WHERE serial = ?"
    assert query(live, reason, serial) == [(1,)] and query(backup, reason, serial) == [(6,)]  # keyCompromise; certificateHold

    refused = env.cli("db", "restore", "--from", str(backup), check=False)
    assert refused.returncode == 1, refused.stdout
    assert "1 later change(s) to revocation(s)" in refused.stderr and "a hold made final would be a hold again" in refused.stderr
    assert "--accept-loss" in refused.stderr, refused.stderr
    assert query(live, reason, serial) == [(1,)]  # still final: Unrevoke cannot lift it
    restored = env.cli("db", "restore", "--from", str(backup), "--accept-loss")
    assert f"revocations back to the backup's state: {serial}" in restored.stdout, restored.stdout


def test_a_backup_whose_tables_disagree_with_its_audit_log_is_refused(tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path) -> None:
    """The log vouches for the events only: a revocation row deleted from a backup left the certificate off the next CRL."""
    env = make_env(tmp_path_factory.mktemp("disagree"), softhsm_conf)
    env.edit_config("127.0.0.1:8080", f"127.0.0.1:{free_port()}")
    serial = _revoked_while_serving(env, ca_pb2.REVOCATION_REASON_KEY_COMPROMISE)
    backups = tmp_path_factory.mktemp("disagreebackups")
    good = backups / "good.db"
    env.cli("db", "backup", "--out", str(good))
    tampered = backups / "tampered.db"
    tampered.write_bytes(good.read_bytes())
    with sqlite3.connect(tampered) as db:
        db.execute("DELETE FROM revocations WHERE serial = ?", (serial,))
    live = database(env)
    live.write_bytes(b"\0" * 4096)  # the database in place no longer reads: nothing to compare the backup with
    refused = env.cli("db", "restore", "--from", str(tampered), "--accept-loss", check=False)
    assert refused.returncode == 1, refused.stdout
    assert f"records the revocation of {serial}" in refused.stderr and "no longer holds" in refused.stderr, refused.stderr
    assert live.read_bytes() == b"\0" * 4096
    assert "restored" in env.cli("db", "restore", "--from", str(good), "--accept-loss").stdout


def test_a_restore_over_an_unreadable_database_refuses_to_forget_what_the_published_crls_show(
    tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path
) -> None:
    """The usual reason to restore: the database in place no longer reads. The CRL files the daemon wrote still do."""
    env = make_env(tmp_path_factory.mktemp("unreadable"), softhsm_conf)
    env.edit_config("127.0.0.1:8080", f"127.0.0.1:{free_port()}")
    daemon = Daemon(env, env.state_dir / "daemon-1.log").start()
    try:
        with grpc.insecure_channel(env.target) as channel:
            serial = sign(channel).serial
    finally:
        daemon.stop()
    backup = tmp_path_factory.mktemp("unreadablebackups") / "ca.db"
    env.cli("db", "backup", "--out", str(backup))
    daemon = Daemon(env, env.state_dir / "daemon-2.log").start()
    try:
        with grpc.insecure_channel(env.target) as channel:
            later = sign(channel).serial  # issued and revoked after the backup: only the CRLs still name it
            for revoked in (serial, later):
                revoke = ca_pb2.RevokeRequest(serial=revoked, reason=ca_pb2.REVOCATION_REASON_KEY_COMPROMISE)
                stub(channel).Revoke(revoke, timeout=10)
            wait_for_crl(channel, lambda crl: {int(serial, 16), int(later, 16)} <= {e.serial_number for e in crl})
    finally:
        daemon.stop()
    live = database(env)
    published = max(
        x509.load_der_x509_crl(path.read_bytes()).extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        for path in (env.state_dir / "crl").glob("ca-root-1*.crl")
    )
    assert published > max_crl_number(backup)
    live.write_bytes(b"\0" * 4096)  # damaged beyond reading
    for suffix in ("-wal", "-shm"):
        Path(f"{live}{suffix}").unlink(missing_ok=True)

    refused = env.cli("db", "restore", "--from", str(backup), check=False)
    assert refused.returncode == 1, refused.stdout
    assert "could not be read" in refused.stderr, refused.stderr
    assert "1 certificate(s)" in refused.stderr and "2 revocation(s)" in refused.stderr, refused.stderr
    assert f"CRLs of ca-root-1 numbered up to {published}" in refused.stderr, refused.stderr
    assert live.read_bytes() == b"\0" * 4096 and not list(live.parent.glob("*.before-restore-*"))

    restored = env.cli("db", "restore", "--from", str(backup), "--accept-loss")
    assert "the previous database could not be read" in restored.stdout, restored.stdout
    assert f"certificates no longer known: {later}" in restored.stdout, restored.stdout
    no_longer_revoked = ", ".join(sorted((serial, later)))
    assert f"certificates no longer revoked (revoke them again): {no_longer_revoked}" in restored.stdout, restored.stdout
    assert f"the next CRL of ca-root-1 will be numbered above {published}" in restored.stdout, restored.stdout
    assert f"published full CRL {published + 1} of ca-root-1" in env.cli("crl", "publish").stdout


def test_a_lifted_hold_still_on_the_published_crl_is_no_loss_of_the_backup(
    tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path
) -> None:
    """The CRL files may lag the database: a hold lifted before the backup stays on them until the next CRL.

    That CRL's number is one the backup holds, so the backup knows all it shows; only a CRL numbered above
    the backup's can show what the backup lacks.
    """
    env = make_env(tmp_path_factory.mktemp("liftedhold"), softhsm_conf)
    env.edit_config("127.0.0.1:8080", f"127.0.0.1:{free_port()}")
    daemon = Daemon(env, env.state_dir / "daemon-1.log").start()
    try:
        with grpc.insecure_channel(env.target) as channel:
            serial = sign(channel).serial
            hold = ca_pb2.RevokeRequest(serial=serial, reason=ca_pb2.REVOCATION_REASON_CERTIFICATE_HOLD)
            stub(channel).Revoke(hold, timeout=10)
            wait_for_crl(channel, lambda crl: int(serial, 16) in {e.serial_number for e in crl})
    finally:
        daemon.stop()
    env.edit_config("publish_on_revoke = true", "publish_on_revoke = false")  # the lift waits for the next delta (5 min)
    daemon = Daemon(env, env.state_dir / "daemon-2.log").start()
    try:
        with grpc.insecure_channel(env.target) as channel:
            stub(channel).Unrevoke(ca_pb2.UnrevokeRequest(serial=serial), timeout=10)
    finally:
        daemon.stop()
    delta = x509.load_der_x509_crl((env.state_dir / "crl" / "ca-root-1-delta.crl").read_bytes())
    assert int(serial, 16) in {e.serial_number for e in delta}  # the files still show the hold
    backup = tmp_path_factory.mktemp("liftedholdbackups") / "ca.db"
    env.cli("db", "backup", "--out", str(backup))

    restored = env.cli("db", "restore", "--from", str(backup), check=False)
    assert restored.returncode == 0, restored.stderr
    assert "forgotten" not in restored.stdout and "revoke them again" not in restored.stdout, restored.stdout


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (root only; skipped where mounting is not allowed)."""
    with mounted_tmpfs(tmp_path / "disk", "1m") as mount:
        yield mount


def fill(directory: Path, leave: int) -> None:
    """Fill directory's file system up to `leave` bytes free."""
    free = shutil.disk_usage(directory).free
    (directory / "filler").write_bytes(b"\0" * max(0, free - leave))


def test_a_backup_or_restore_without_room_says_so_and_leaves_nothing_half_written(
    tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path, small_disk: Path
) -> None:
    """A full disk is no damaged database: the operator is told there is no room, and where."""
    env = make_env(tmp_path_factory.mktemp("fulldisk"), softhsm_conf)
    live = database(env)
    backups = small_disk / "backups"
    backups.mkdir()
    size = live.stat().st_size
    for leave in (size // 2, size + 4096):  # the copy itself does not fit; the copy fits, its check does not
        fill(backups, leave)
        before = audit_actions(live)
        result = env.cli("db", "backup", "--out", str(backups / "ca.db"), check=False)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert f"{backups} has " in result.stderr and "bytes free" in result.stderr, result.stderr
        assert "not a usable SQLite database" not in result.stderr, result.stderr
        assert sorted(p.name for p in backups.iterdir()) == ["filler"]
        assert audit_actions(live) == before  # refused before the token: no checkpoint signed
        (backups / "filler").unlink()
    good = tmp_path_factory.mktemp("fulldiskbackups") / "ca.db"
    env.cli("db", "backup", "--out", str(good))

    # The state directory on the small disk: the restore's working copy has no room.
    moved = small_disk / "state"
    env.edit_config('url = "sqlite:///ca.db"', f'url = "sqlite:///{moved / live.name}"')
    moved.mkdir()
    shutil.copy2(live, moved / live.name)
    fill(moved, good.stat().st_size // 2)
    in_place = sha256(moved / live.name)
    refused = env.cli("db", "restore", "--from", str(good), check=False)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert f"{moved} has " in refused.stderr and "bytes free" in refused.stderr and "Nothing was changed" in refused.stderr
    assert sha256(moved / live.name) == in_place and sorted(p.name for p in moved.iterdir()) == ["ca.db", "filler"]


def test_a_backup_fits_where_the_database_fits_whatever_the_size_of_its_write_ahead_log(
    tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path, small_disk: Path
) -> None:
    """A WAL file keeps the size it once grew to (a reader held it open while Sign calls committed): the copy does not."""
    env = make_env(tmp_path_factory.mktemp("bigwal"), softhsm_conf)
    env.edit_config("127.0.0.1:8080", f"127.0.0.1:{free_port()}")
    live = database(env)
    wal = Path(f"{live}-wal")
    daemon = Daemon(env, env.state_dir / "daemon.log").start()
    try:
        with contextlib.closing(sqlite3.connect(live)) as reader, grpc.insecure_channel(env.target) as channel:
            reader.execute("BEGIN")
            reader.execute("SELECT count(*) FROM certificates").fetchone()  # a long read: no checkpoint gets past it
            while wal.stat().st_size < 2 * 1024 * 1024:
                sign(channel)
            reader.execute("COMMIT")
        with contextlib.closing(sqlite3.connect(live)) as db:
            db.execute("PRAGMA wal_checkpoint(PASSIVE)")
            pages = int(db.execute("PRAGMA page_count").fetchone()[0]) * int(db.execute("PRAGMA page_size").fetchone()[0])
        assert wal.stat().st_size >= 2 * 1024 * 1024 and pages < 512 * 1024, (wal.stat().st_size, pages)
        backup = small_disk / "ca.db"  # 1 MiB: room for the copy and its check, not for the WAL's size
        result = env.cli("db", "backup", "--out", str(backup), check=False)
        assert result.returncode == 0, result.stderr
    finally:
        daemon.stop()
    assert "restored" in env.cli("db", "restore", "--from", str(backup)).stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
def test_a_restore_run_as_root_keeps_the_database_owned_by_the_service_user(
    tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path
) -> None:
    """deploy/README.md runs the commands as root, the daemon as its own user: a root-owned 0600 database it cannot open."""
    env = make_env(tmp_path_factory.mktemp("owner"), softhsm_conf)
    backup = tmp_path_factory.mktemp("ownerbackups") / "ca.db"
    env.cli("db", "backup", "--out", str(backup))
    live = database(env)
    service = (65534, 65534)  # the service user's (nobody's here)
    for path in live.parent.glob(live.name + "*"):
        os.chown(path, *service)
    env.cli("db", "restore", "--from", str(backup))
    owners = {path.name: (path.stat().st_uid, path.stat().st_gid) for path in live.parent.glob(live.name + "*")}
    assert owners == dict.fromkeys(owners, service), owners
    assert stat.S_IMODE(live.stat().st_mode) == 0o600


def test_a_copy_of_another_cas_database_is_refused(tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path) -> None:
    """Its log verifies as a chain, but no checkpoint of this CA's audit key covers it (every `db backup` signs one)."""
    base = tmp_path_factory.mktemp("foreign")
    ours, theirs = make_env(base, softhsm_conf), make_env(base, softhsm_conf)
    foreign = tmp_path_factory.mktemp("foreignbackups") / "ca.db"
    foreign.write_bytes(database(theirs).read_bytes())  # a plain copy of a fresh CA's database: no checkpoint yet
    live = database(ours)
    live.write_bytes(b"\0" * 4096)  # nothing in place to compare with
    refused = ours.cli("db", "restore", "--from", str(foreign), "--accept-loss", check=False)
    assert refused.returncode == 1, refused.stdout
    assert "no checkpoint signed by this CA's audit key" in refused.stderr, refused.stderr
    assert live.read_bytes() == b"\0" * 4096 and not list(live.parent.glob("*.before-restore-*"))


def test_two_backups_to_one_file_at_once_keep_one_whole_copy_and_the_other_is_refused(
    tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path
) -> None:
    """Cron and a person, say. Both shared one partial file, which each removed at its start (the other's copy, mid-write), and
    the last to finish replaced the other's finished backup, both saying 'wrote'. A partial copy of a backup killed mid-copy
    is removed by the next backup to that file; one of a backup still running stays."""
    env = make_env(tmp_path_factory.mktemp("twice"), softhsm_conf)
    config = config_module.load(env.config_path)
    with app.connected(config) as (hsm, store):
        audit.Checkpointer(hsm, store, config.audit.key_uri).checkpoint()  # as `db backup` does first
        audit_key = audit.audit_public_key_pem(hsm, config.audit.key_uri)
    out = env.state_dir / "backups" / "ca.db"
    out.parent.mkdir()
    abandoned = out.parent / f".ca.db.{_a_finished_pid()}.0a1b2c3d.partial"
    abandoned.write_bytes(b"half a copy")
    with subprocess.Popen(["sleep", "60"]) as running:
        in_progress = out.parent / f".ca.db.{running.pid}.0a1b2c3d.partial"
        in_progress.write_bytes(b"a copy being written")
        outcomes = at_once(lambda: backup_module.backup(config.store.url, out, audit_key))
        running.kill()
    kept = [o for o in outcomes if isinstance(o, backup_module.BackupSummary)]
    refused = [o for o in outcomes if isinstance(o, FailedPrecondition)]
    assert len(kept) == 1 and len(refused) == 1, outcomes
    assert "exists" in str(refused[0]) or "was created while this backup was taken" in str(refused[0]), refused[0]
    assert sha256(out) == kept[0].sha256 and query(out, "PRAGMA integrity_check") == [("ok",)]
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(["ca.db", in_progress.name]), list(out.parent.iterdir())


def _a_finished_pid() -> int:
    with subprocess.Popen(["true"]) as finished:
        finished.wait()
    return finished.pid
