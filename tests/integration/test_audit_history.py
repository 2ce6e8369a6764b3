"""An auditor's earlier export against a later log: `ca-daemon audit verify --previous`.

The daemon's checkpoints vouch for a chain only while some process remembers the head it
signed: a log rewritten, rolled back to an older copy or cut after its last checkpoint, and
then signed again by a new process (`audit export --checkpoint` here), verifies on its own.
What the auditor held before is what tells. Real token, real SQLite, the daemon's own CLI.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
import sqlite3
import subprocess
import tracemalloc
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.protobuf.timestamp_pb2 import Timestamp

from ca_daemon import audit, crl_der
from ca_daemon._proto.ca_daemon.v1 import ca_pb2
from ca_daemon.audit_hash import GENESIS, event_hash
from ca_daemon.client import CaClient
from ca_daemon.model import AuditEvent
from ca_daemon.store import open_store
from tests.conftest import CaEnv, Daemon, free_port, make_env
from tests.integration.crl_helpers import sign, stub


def _setup(tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path, name: str) -> tuple[CaEnv, Path, Path]:
    env = make_env(tmp_path_factory.mktemp(name), softhsm_conf)
    public = env.state_dir / "audit.pem"
    env.cli("audit", "public-key", "--out", str(public))
    return env, env.state_dir / "ca.db", public


def _start_daemon(env: CaEnv) -> Daemon:
    """The daemon, its HTTP server on a free port (8080 may be another's)."""
    env.edit_config("127.0.0.1:8080", f"127.0.0.1:{free_port()}")
    return Daemon(env, env.state_dir / "daemon.log").start()


def _export(env: CaEnv, name: str, *, checkpoint: bool = True) -> Path:
    out = env.state_dir / name
    env.cli("audit", "export", "--out", str(out), *(["--checkpoint"] if checkpoint else []))
    return out


def _verify(env: CaEnv, public: Path, export: Path, previous: Path | None = None) -> tuple[int, str]:
    extra = ["--previous", str(previous)] if previous else []
    result = env.cli("audit", "verify", "--file", str(export), "--public-key", str(public), *extra, check=False)
    return result.returncode, result.stdout + result.stderr


def _live_fails(env: CaEnv, public: Path) -> str:
    """After tables were changed behind the daemon's back: the log alone still verifies, `--live` does not; its output."""
    code, out = _verify(env, public, _export(env, "after.jsonl", checkpoint=False))
    assert code == 0 and out.startswith("OK:"), out  # the log itself is untouched
    live = env.cli("audit", "verify", "--live", "--public-key", str(public), check=False)
    assert live.returncode == 1, live.stdout
    return live.stdout


def _append_event(env: CaEnv) -> None:
    """One more event: `db backup` signs a checkpoint of the head, then records a db.backup event no checkpoint covers yet."""
    copies = env.state_dir / "copies"
    copies.mkdir(exist_ok=True)
    env.cli("db", "backup", "--out", str(copies / f"{len(list(copies.iterdir()))}.db"))


def _rewrite(db: Path, seq: int) -> None:
    """An insider's edit: re-attribute event seq, recompute every later hash, delete the checkpoints that covered it."""
    with sqlite3.connect(db, timeout=30) as conn:
        conn.row_factory = sqlite3.Row
        conn.execute("UPDATE audit_events SET actor = 'someone-else' WHERE seq = ?", (seq,))
        prev = GENESIS
        for row in conn.execute("SELECT * FROM audit_events ORDER BY seq").fetchall():
            fields = dict(row, time=datetime.fromisoformat(row["time"]))
            digest = event_hash(fields, row["seq"], prev)
            conn.execute("UPDATE audit_events SET prev_hash = ?, hash = ? WHERE seq = ?", (prev, digest, row["seq"]))
            prev = digest
        conn.execute("DELETE FROM audit_checkpoints WHERE seq >= ?", (seq,))


def test_a_log_rewritten_and_signed_again_verifies_alone_and_fails_against_the_earlier_export(
    tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path
) -> None:
    env, db, public = _setup(tmp_path_factory, softhsm_conf, "history-rewritten")
    _append_event(env)
    early = _export(env, "early.jsonl")
    _append_event(env)
    grown = _export(env, "grown.jsonl")
    code, out = _verify(env, public, grown, previous=early)
    assert code == 0 and out.startswith("OK:"), out  # a log that only grew agrees with the earlier export

    _rewrite(db, 2)
    later = _export(env, "later.jsonl")  # a new process: it signs the rewritten head
    code, out = _verify(env, public, later)
    assert code == 0 and out.startswith("OK:"), out  # the gap: alone, nothing tells
    code, out = _verify(env, public, later, previous=early)
    assert code == 1, out
    assert "FAILED: first bad event: seq 2; event 2 differs in this log" in out, out
    assert "was rolled back or rewritten since, and checkpoints signed later cover the new chain" in out, out


def test_a_log_rolled_back_to_an_older_copy_fails_against_the_earlier_export(
    tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path
) -> None:
    env, db, public = _setup(tmp_path_factory, softhsm_conf, "history-rolled-back")
    copy = env.state_dir / "copy.db"
    env.cli("db", "backup", "--out", str(copy))
    _append_event(env)
    _append_event(env)
    early = _export(env, "early.jsonl")
    held = sum(1 for line in early.read_text().splitlines() if '"type": "event"' in line)

    for suffix in ("-wal", "-shm"):
        db.with_name(db.name + suffix).unlink(missing_ok=True)
    shutil.copyfile(copy, db)  # the older copy put in place by hand, not by `db restore`
    _append_event(env)  # the log goes on, reusing the seq numbers of what was lost
    later = _export(env, "later.jsonl")
    code, out = _verify(env, public, later)
    assert code == 0 and out.startswith("OK:"), out
    code, out = _verify(env, public, later, previous=early)
    assert code == 1, out
    assert f"held events 1..{held} and the audit key signed its head at seq {held}" in out, out
    assert "was rolled back or rewritten since" in out, out


def test_events_removed_before_a_checkpoint_covered_them_fail_against_an_export_that_held_them(
    tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path
) -> None:
    env, db, public = _setup(tmp_path_factory, softhsm_conf, "history-cut")
    covered = _export(env, "covered.jsonl")
    last_checkpoint = max(row[0] for row in sqlite3.connect(db).execute("SELECT seq FROM audit_checkpoints"))
    _append_event(env)  # an event no checkpoint covers yet (no daemon signs one)
    early = _export(env, "early.jsonl", checkpoint=False)
    code, out = _verify(env, public, early)
    assert code == 0 and "not covered by a signature yet" in out, out

    with sqlite3.connect(db, timeout=30) as conn:
        assert conn.execute("DELETE FROM audit_events WHERE seq > ?", (last_checkpoint,)).rowcount > 0
    _append_event(env)
    later = _export(env, "later.jsonl")
    code, out = _verify(env, public, later)
    assert code == 0 and out.startswith("OK:"), out
    assert _verify(env, public, later, previous=covered)[0] == 0  # that export held none of them
    code, out = _verify(env, public, later, previous=early)
    assert code == 1, out
    assert f"first bad event: seq {last_checkpoint + 1}; event {last_checkpoint + 1} differs in this log" in out, out
    assert f"no checkpoint covered it then (the earlier export's last was at seq {last_checkpoint})" in out, out


def test_an_earlier_export_that_does_not_verify_is_not_used(tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path) -> None:
    env, _, public = _setup(tmp_path_factory, softhsm_conf, "history-bad-earlier")
    early = _export(env, "early.jsonl")
    lines = early.read_text().splitlines()
    early.write_text("\n".join(lines[:-1]) + "\n")  # its end record lost
    code, out = _verify(env, public, _export(env, "later.jsonl"), previous=early)
    assert code == 1, out
    assert f"the earlier export {early} does not verify itself, so nothing is compared with it: FAILED" in out, out


def test_a_public_key_file_of_another_kind_is_named_with_what_to_give(tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path) -> None:
    """A certificate, an empty file or a file that is not PEM given as --public-key failed with cryptography's "Unable to
    load PEM file ... MalformedFraming" or "Valid PEM but no BEGIN PUBLIC KEY", naming neither the option nor the file."""
    env, _, _public = _setup(tmp_path_factory, softhsm_conf, "history-bad-key")
    certificate, empty, garbage = (env.state_dir / name for name in ("ca.pem", "empty.pem", "garbage.pem"))
    env.cli("ca", "export", "--out", str(certificate))
    empty.write_bytes(b"")
    garbage.write_bytes(b"\x30\x82\x01\x00")
    for given, kind in ((certificate, "a certificate"), (empty, "empty"), (garbage, "not PEM")):
        result = env.cli("audit", "verify", "--live", "--public-key", str(given), check=False)
        expected = f"ca-daemon: --public-key {given} is {kind}, not a PEM public key (-----BEGIN PUBLIC KEY-----)"
        assert result.returncode == 1 and result.stderr.startswith(expected), result


def _copy_database(source: Path, target: Path) -> None:
    with contextlib.closing(sqlite3.connect(source)) as src, contextlib.closing(sqlite3.connect(target)) as dst:
        src.backup(dst)


def test_verify_live_names_an_event_or_checkpoint_row_the_database_holds_in_a_form_no_writer_gives(
    tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path
) -> None:
    """SQLite keeps text written into a time or BLOB column: verify --live said why in a traceback, naming no event."""
    env, db, public = _setup(tmp_path_factory, softhsm_conf, "history-unreadable")
    _export(env, "covered.jsonl")  # a checkpoint of the head
    _append_event(env)
    original = env.state_dir / "original.db"
    _copy_database(db, original)

    def live_and_export(statement: str) -> tuple[str, str]:
        _copy_database(original, db)
        with sqlite3.connect(db, timeout=30) as conn:
            conn.execute(statement)
        live = env.cli("audit", "verify", "--live", "--public-key", str(public), check=False)
        assert live.returncode == 1 and "Traceback" not in live.stderr, live.stdout + live.stderr
        out = env.cli("audit", "export", "--out", str(env.state_dir / "unreadable.jsonl"), check=False)
        assert out.returncode == 1 and "Traceback" not in out.stderr, out.stdout + out.stderr
        return live.stdout, out.stderr

    live, export = live_and_export("UPDATE audit_events SET request_digest = 'abc' WHERE seq = 2")
    assert live.startswith("FAILED: first bad event: seq 2; event 2 could not be read from the database"), live
    assert "event 2 could not be read from the database" in export, export
    live, export = live_and_export("UPDATE audit_events SET time = 'yesterday' WHERE seq = 3")
    assert live.startswith("FAILED: first bad event: seq 3; event 3 could not be read from the database (Invalid isoformat"), live
    live, _ = live_and_export("UPDATE audit_checkpoints SET head_hash = 'abc'")
    assert live.startswith("FAILED: the audit_checkpoints table could not be read from the database"), live
    # Text that is not UTF-8: the driver's error, which the store reports as an outage ("the database is unavailable").
    live, export = live_and_export("UPDATE audit_events SET actor = CAST(X'ff41' AS TEXT) WHERE seq = 2")
    assert live.startswith("FAILED: first bad event: seq 2; event 2 could not be read from the database (Could not decode"), live
    assert "event 2 could not be read from the database" in export and "unavailable" not in export, export
    live, _ = live_and_export("UPDATE audit_checkpoints SET key_id = CAST(X'ff41' AS TEXT)")
    assert live.startswith("FAILED: the audit_checkpoints table could not be read from the database (Could not decode"), live
    _copy_database(original, db)
    assert env.cli("audit", "verify", "--live", "--public-key", str(public)).stdout.startswith("OK:")


def test_an_export_reads_the_checkpoints_a_page_at_a_time(tmp_path: Path) -> None:
    """Every stored checkpoint was loaded as a record before the first event was written: 196 MB RSS for 100,000."""
    store = open_store(f"sqlite:///{tmp_path / 'ca.db'}")
    try:
        store.append_audit([AuditEvent(time=datetime.now(UTC), actor="cli:test", action="db.backup", outcome="written")])
        checkpoints = 20_000
        _a_checkpoint_per_event(tmp_path / "ca.db", checkpoints)
        sink = io.StringIO()
        tracemalloc.start()
        try:
            written = audit.export(store, _Discard())
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert written == (checkpoints, checkpoints)
        # What is left is a page of 5,000 events (about 12 MB here), whatever the number of checkpoints.
        assert peak < 900 * checkpoints, f"{peak / checkpoints:.0f} bytes a checkpoint"
        audit.export(store, sink)  # the same file as before: each checkpoint right after its event
        kinds = [json.loads(line)["type"] for line in sink.getvalue().splitlines()]
        assert kinds == ["header", *["event", "checkpoint"] * checkpoints, "end"]
    finally:
        store.close()


def _a_checkpoint_per_event(db: Path, events: int) -> None:
    """Copies of the log's last event up to seq events, and a checkpoint of each seq (neither hashed nor signed: sizes only)."""
    with sqlite3.connect(db) as conn:
        columns = [row[1] for row in conn.execute("PRAGMA table_info(audit_events)")]
        event = dict(zip(columns, conn.execute("SELECT * FROM audit_events ORDER BY seq DESC LIMIT 1").fetchone(), strict=True))
        conn.executemany(
            f"INSERT INTO audit_events ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
            ([*{**event, "seq": seq}.values()] for seq in range(event["seq"] + 1, events + 1)),
        )
        conn.execute("DELETE FROM audit_checkpoints")
        conn.executemany(
            "INSERT INTO audit_checkpoints (seq, count, head_hash, time, key_id, signature) VALUES (?, ?, ?, ?, 'audit', ?)",
            ((seq, seq, b"\x01" * 32, "2026-11-27 07:00:00.000000", b"\x02" * 70) for seq in range(1, events + 1)),
        )


def test_a_client_export_reads_the_checkpoints_a_page_at_a_time(tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path) -> None:
    """`client audit-export` fetched every checkpoint into a list before the first event was written: a year of
    checkpoints every 300 s is about 100,000, each a dict of about 1 KB."""
    env = make_env(tmp_path_factory.mktemp("client-export"), softhsm_conf)
    checkpoints = 20_000
    _a_checkpoint_per_event(env.state_dir / "ca.db", checkpoints)
    daemon = _start_daemon(env)
    try:
        with CaClient(env.target, timeout=60) as client:
            tracemalloc.start()
            try:
                written = client.audit_export(_Discard())
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            # What is left is one call's events (about 3 MB here), whatever the number of checkpoints; it was 890 bytes a checkpoint.
            assert peak < 250 * checkpoints, f"{peak / checkpoints:.0f} bytes a checkpoint"
            sink = io.StringIO()
            client.audit_export(sink)
            assert client.last_audit_checkpoint_seq() == checkpoints
    finally:
        daemon.stop()
    # The daemon appends a few events as it starts, after the last checkpoint; it signs none over these unsigned ones.
    assert written[1] == checkpoints and written[0] >= checkpoints, written
    kinds = [json.loads(line)["type"] for line in sink.getvalue().splitlines()]
    assert kinds == ["header", *["event", "checkpoint"] * checkpoints, *["event"] * (written[0] - checkpoints), "end"]


class _Discard(io.StringIO):
    def write(self, text: str) -> int:
        return len(text)


def test_verify_live_compares_the_certificates_and_revocations_tables_with_the_events_that_recorded_them(
    tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path
) -> None:
    """Rows deleted or changed behind the daemon's back, which the chain does not vouch for, are named by `audit verify --live`.

    Seen in a hostile review: a keyCompromise revocation deleted from revocations was left off the next full CRL
    (openssl verify -crl_check accepted the certificate), and a deleted certificate row made Revoke answer NOT_FOUND,
    while `audit verify` said OK over the untouched log.
    """
    env, db, public = _setup(tmp_path_factory, softhsm_conf, "history-tables")
    daemon = _start_daemon(env)
    try:
        with grpc.insecure_channel(env.target) as channel:
            a, b, c, d, e = (sign(channel).serial.lower() for _ in range(5))
            revoke = stub(channel).Revoke
            revoke(ca_pb2.RevokeRequest(serial=a, reason=ca_pb2.REVOCATION_REASON_KEY_COMPROMISE), timeout=10)
            revoke(ca_pb2.RevokeRequest(serial=b, reason=ca_pb2.REVOCATION_REASON_CERTIFICATE_HOLD), timeout=10)
            revoke(ca_pb2.RevokeRequest(serial=d, reason=ca_pb2.REVOCATION_REASON_CERTIFICATE_HOLD), timeout=10)
            stub(channel).Unrevoke(ca_pb2.UnrevokeRequest(serial=d), timeout=10)
    finally:
        daemon.stop()
    live = env.cli("audit", "verify", "--live", "--public-key", str(public), check=False)
    assert live.returncode == 0 and live.stdout.startswith("OK:"), live.stdout  # a revocation, a hold and a lifted hold agree

    with sqlite3.connect(db, timeout=30) as conn:
        conn.execute("DELETE FROM revocations WHERE serial = ?", (a,))
        conn.execute("UPDATE revocations SET reason = 0 WHERE serial = ?", (b,))
        conn.execute("DELETE FROM certificates WHERE serial = ?", (c,))
        conn.execute("UPDATE revocations SET lifted_at = NULL WHERE serial = ?", (d,))
        columns = "issuer_key_id, reason, revoked_at, invalidity_date, revoked_by, lifted_at, change_seq, not_after, entry_der"
        conn.execute(f"INSERT INTO revocations (serial, {columns}) SELECT ?, {columns} FROM revocations WHERE serial = ?", (e, b))
    out = _live_fails(env, public)
    assert f"records the revocation of {a} (key_compromise), which the revocations table no longer holds" in out, out
    assert f"records the revocation of {b} as certificate_hold, the revocations table says unspecified" in out, out
    assert f"records the issuance of serial {c}, which the certificates table no longer holds" in out, out
    assert f"records that the hold on {d} was lifted, but the revocations table has it revoked (certificate_hold)" in out, out
    assert f"the revocations table revokes {e} (unspecified), but no event records its revocation" in out, out


def test_verify_live_reports_a_table_row_no_writer_gives_as_a_failure_not_an_error(
    tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path
) -> None:
    """Text in an integer column, or text that is not UTF-8: `verify --live` ended with an error and no FAILED line."""
    env, db, public = _setup(tmp_path_factory, softhsm_conf, "history-table-forms")
    daemon = _start_daemon(env)
    try:
        with grpc.insecure_channel(env.target) as channel:
            revoked = sign(channel).serial.lower()
            stub(channel).Revoke(ca_pb2.RevokeRequest(serial=revoked, reason=ca_pb2.REVOCATION_REASON_KEY_COMPROMISE), timeout=10)
    finally:
        daemon.stop()
    original = env.state_dir / "original.db"
    _copy_database(db, original)

    def live(statement: str) -> str:
        _copy_database(original, db)
        with sqlite3.connect(db, timeout=30) as conn:
            conn.execute(statement, (revoked,))
        result = env.cli("audit", "verify", "--live", "--public-key", str(public), check=False)
        assert result.returncode == 1 and result.stdout.startswith("FAILED:") and not result.stderr, result.stdout + result.stderr
        return result.stdout

    out = live("UPDATE revocations SET reason = 'abc' WHERE serial = ?")  # was: "invalid literal for int() with base 10"
    assert f"records the revocation of {revoked} as key_compromise, the revocations table says reason code 'abc'" in out, out
    out = live("UPDATE revocations SET issuer_key_id = CAST(X'ff41' AS TEXT) WHERE serial = ?")  # was: "the database is unavailable"
    assert "the revocations table could not be read to the end (Could not decode to UTF-8 column 'issuer_key_id'" in out, out
    out = live("UPDATE revocations SET reason = CAST(X'ff41' AS TEXT) WHERE serial = ?")
    assert "the certificates and revocations tables could not be compared with the events (Could not decode" in out, out


def test_verify_live_compares_each_revocation_row_with_its_event_in_what_the_crls_are_built_from(
    tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path
) -> None:
    """A revocation row keeping its reason but changed where the CRLs are built from is named by `audit verify --live`.

    Every full CRL copies the row's stored entry (entry_der) as it is, lists it under the row's CA key, and drops
    it after the row's not_after. Before, --live compared only the reason: with a's entry swapped for another
    serial's, the next full CRL left a out (openssl verify -crl_check accepted it), and --live said OK.
    """
    env, db, public = _setup(tmp_path_factory, softhsm_conf, "history-entries")
    daemon = _start_daemon(env)
    try:
        with grpc.insecure_channel(env.target) as channel:
            signed = [sign(channel) for _ in range(8)]
            a, b, c, d, z, e, f, g = (response.serial.lower() for response in signed)
            invalid_since = Timestamp()
            invalid_since.FromDatetime(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))
            for serial in (a, b, c, z, e, f, g):
                request = ca_pb2.RevokeRequest(serial=serial, reason=ca_pb2.REVOCATION_REASON_KEY_COMPROMISE)
                if serial == a:
                    request.invalidity_date.CopyFrom(invalid_since)
                stub(channel).Revoke(request, timeout=10)
            stub(channel).Revoke(ca_pb2.RevokeRequest(serial=d, reason=ca_pb2.REVOCATION_REASON_SUPERSEDED), timeout=10)
    finally:
        daemon.stop()
    live = env.cli("audit", "verify", "--live", "--public-key", str(public), check=False)
    assert live.returncode == 0 and live.stdout.startswith("OK:"), live.stdout  # the invalidity date and reasons agree

    with sqlite3.connect(db, timeout=30) as conn:
        conn.execute("UPDATE revocations SET entry_der = (SELECT entry_der FROM revocations WHERE serial = ?) WHERE serial = ?", (z, a))
        conn.execute("UPDATE revocations SET not_after = '2001-01-01 00:00:00.000000' WHERE serial = ?", (b,))
        conn.execute("UPDATE revocations SET issuer_key_id = 'ca-elsewhere' WHERE serial = ?", (c,))
        conn.execute("UPDATE revocations SET revoked_at = '2020-01-01 00:00:00.000000' WHERE serial = ?", (d,))
        # e: its certificate row swapped for a stand-in of the same serial, expired and signed by another key, to make a
        # moved-back not_after look right; f: an entry no CRL parser reads (two reasonCode extensions).
        conn.execute("UPDATE certificates SET der = ? WHERE serial = ?", (_expired_stand_in(int(e, 16)), e))
        conn.execute("UPDATE revocations SET not_after = '2001-01-02 00:00:00.000000' WHERE serial = ?", (e,))
        reason_twice = 2 * crl_der.extension(bytes.fromhex("0603551d15"), crl_der.tlv(0x0A, b"\x01"))
        entry = crl_der.tlv(0x30, crl_der.integer(int(f, 16)) + crl_der.time(datetime.now(UTC)) + crl_der.tlv(0x30, reason_twice))
        conn.execute("UPDATE revocations SET entry_der = ? WHERE serial = ?", (entry, f))
        # g: its certificate row deleted (the foreign key is not enforced on this connection) and not_after moved back.
        conn.execute("DELETE FROM certificates WHERE serial = ?", (g,))
        conn.execute("UPDATE revocations SET not_after = '2001-01-03 00:00:00.000000' WHERE serial = ?", (g,))
    # What a relying party meets: full CRLs leave a, b (from the second on: expired on the one before) and c out,
    # and a passes a CRL check.
    for _ in range(2):
        assert "published full CRL" in env.cli("crl", "publish").stdout
    with sqlite3.connect(db) as conn:
        (full_crl,) = conn.execute("SELECT der FROM crls WHERE is_delta = 0 ORDER BY crl_number DESC LIMIT 1").fetchone()
    listed = {entry.serial_number for entry in x509.load_der_x509_crl(full_crl)}
    assert int(z, 16) in listed and int(d, 16) in listed and not {int(a, 16), int(b, 16), int(c, 16)} & listed, listed
    (env.state_dir / "crl.pem").write_bytes(x509.load_der_x509_crl(full_crl).public_bytes(serialization.Encoding.PEM))
    (env.state_dir / "a.pem").write_text(signed[0].certificate_pem)
    (env.state_dir / "chain.pem").write_text(signed[0].chain_pem)
    files = [str(env.state_dir / name) for name in ("crl.pem", "chain.pem", "a.pem")]
    accepted = subprocess.run(
        ["openssl", "verify", "-crl_check", "-CRLfile", files[0], "-CAfile", files[1], files[2]],
        capture_output=True,
        text=True,
        check=False,
    )
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr

    out = _live_fails(env, public)
    assert f"records the revocation of {a} (key_compromise), but the CRL entry stored for it (entry_der) reads serial {z}," in out, out
    assert f"records the revocation of {b} (key_compromise), but the revocations table says the certificate expires 2001-01-01" in out
    assert f"records the revocation of {c} (key_compromise), but the revocations table files it under CA key ca-elsewhere" in out
    assert f"records the revocation of {d} (superseded), but the revocations table dates it 2020-01-01T00:00:00+00:00" in out, out
    assert f"records the revocation of {e} (key_compromise), but the certificates table holds for it no certificate of serial {e} " in out
    assert f"records the revocation of {f} (key_compromise), but the CRL entry stored for it (entry_der) reads as no valid CRL entry" in out
    assert f"records the revocation of {g} (key_compromise), but the certificates table no longer holds its certificate" in out, out
    assert f"records the revocation of {z}" not in out, out  # the untouched row is not named


def _expired_stand_in(serial: int) -> bytes:
    """A certificate of this serial that expired in 2001, signed by a key of its own (not the CA's)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "stand-in")])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(datetime(2000, 1, 1, tzinfo=UTC))
        .not_valid_after(datetime(2001, 1, 2, tzinfo=UTC))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )


def test_each_issuance_event_names_the_certificate_and_verify_live_finds_another_in_its_row(
    tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path
) -> None:
    """The certificates row is what a retried Sign and GetCertificate hand out, and no event vouched for it: a row whose DER
    was replaced went unnoticed by `audit verify --live`. Each certificate.issue event now records the certificate's
    SHA-256, the very certificate the client received, and --live compares the rows with it."""
    env, db, public = _setup(tmp_path_factory, softhsm_conf, "history-certificates")
    daemon = _start_daemon(env)
    try:
        with grpc.insecure_channel(env.target) as channel:
            issued = [sign(channel) for _ in range(2)]
    finally:
        daemon.stop()
    with sqlite3.connect(db) as conn:
        for response in issued:
            (details,) = conn.execute(
                "SELECT details FROM audit_events WHERE action = 'certificate.issue' AND serial = ?", (response.serial.lower(),)
            ).fetchone()
            received = x509.load_pem_x509_certificate(response.certificate_pem.encode()).public_bytes(serialization.Encoding.DER)
            assert json.loads(details)["certificate_sha256"] == hashlib.sha256(received).hexdigest()
    live = env.cli("audit", "verify", "--live", "--public-key", str(public), check=False)
    assert live.returncode == 0 and live.stdout.startswith("OK:"), live.stdout

    first, second = (response.serial.lower() for response in issued)
    with sqlite3.connect(db, timeout=30) as conn:
        conn.execute("UPDATE certificates SET der = (SELECT der FROM certificates WHERE serial = ?) WHERE serial = ?", (second, first))
    out = _live_fails(env, public)
    assert f"records the issuance of serial {first} as the certificate with SHA-256" in out, out
    assert "but the certificates table holds another one for it" in out, out
    assert f"records the issuance of serial {second}" not in out, out


def test_each_key_generation_event_names_the_public_key_and_verify_live_finds_another_in_its_row(
    tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path
) -> None:
    """`audit verify --live` checks signatures (of revoked certificates, whose notAfter it reads) with the public keys of
    the ca_keys rows, which no event vouched for: a row whose key was swapped for one of the tamperer's would vouch for
    what that key signed. Each key.generate event now records the public key's SHA-256, and --live compares the rows."""
    env, db, public = _setup(tmp_path_factory, softhsm_conf, "history-keys")
    with sqlite3.connect(db) as conn:
        (details,) = conn.execute("SELECT details FROM audit_events WHERE action = 'key.generate' AND key_id = 'ca-root-1'").fetchone()
        (held,) = conn.execute("SELECT public_key_der FROM ca_keys WHERE key_id = 'ca-root-1'").fetchone()
    assert json.loads(details)["public_key_sha256"] == hashlib.sha256(held).hexdigest()
    live = env.cli("audit", "verify", "--live", "--public-key", str(public), check=False)
    assert live.returncode == 0 and live.stdout.startswith("OK:"), live.stdout

    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    swapped = other.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    with sqlite3.connect(db, timeout=30) as conn:
        conn.execute("UPDATE ca_keys SET public_key_der = ? WHERE key_id = 'ca-root-1'", (swapped,))
    out = _live_fails(env, public)
    assert "records the generation of CA key ca-root-1 with the public key of SHA-256 " in out, out
    assert f"but the ca_keys table holds another one for it ({hashlib.sha256(swapped).hexdigest()[:16]}...)" in out, out


def test_an_issuance_event_removed_before_a_checkpoint_is_recorded_as_an_audit_gap_when_the_daemon_stops(
    tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path
) -> None:
    """Seen in a hostile review: a certificate was issued, its event and row deleted before the next checkpoint, and the
    daemon went on (or stopped, signing its last checkpoint) over a log that verified without it. The store remembers
    its last event; the checkpointer a stopping worker runs records an audit.gap event, and verify names it."""
    env, db, public = _setup(tmp_path_factory, softhsm_conf, "history-gap")
    daemon = _start_daemon(env)
    try:
        with grpc.insecure_channel(env.target) as channel:
            serial = sign(channel, "evil-1").serial.lower()
        with sqlite3.connect(db, timeout=30) as conn:
            (seq, digest) = conn.execute("SELECT seq, hash FROM audit_events WHERE serial = ?", (serial,)).fetchone()
            assert (conn.execute("SELECT max(seq) FROM audit_checkpoints").fetchone()[0] or 0) < seq  # no checkpoint covers it
            conn.execute("DELETE FROM audit_events WHERE seq = ?", (seq,))
            conn.execute("DELETE FROM certificates WHERE serial = ?", (serial,))
    finally:
        daemon.stop()
    code, out = _verify(env, public, _export(env, "after.jsonl", checkpoint=False))
    assert code == 0 and f"1 audit.gap event(s), the first at seq {seq}: the daemon found events it had written removed" in out, out
    assert "not covered" not in out, out  # the stopping worker signed the head, gap event included
    with sqlite3.connect(db) as conn:
        (details,) = conn.execute("SELECT details FROM audit_events WHERE action = 'audit.gap'").fetchone()
    assert json.loads(details) == {"written_seq": str(seq), "written_hash": bytes(digest).hex(), "head_seq": str(seq - 1)}
    assert f"audit log: event {seq}, which this process wrote" in daemon.log(), daemon.log()[-2000:]


def test_issuance_events_cut_from_the_end_of_the_log_are_named_by_the_certificates_they_issued(
    tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path
) -> None:
    """An auditor's check that nothing was removed from the issuance log, after a crash.

    The daemon was killed (no audit.gap: the process that remembered its last event is gone) and someone with the
    database cut the issuance events written after the last checkpoint off the end of the log, leaving the
    certificates: `audit verify --live` said OK ("... last at seq N"), though the certificates table held certificates
    the CA issued and the log no longer named. Each certificates row is now matched with the event that issued it.
    """
    env, db, public = _setup(tmp_path_factory, softhsm_conf, "history-cut-end")
    daemon = _start_daemon(env)
    try:
        with grpc.insecure_channel(env.target) as channel:
            sign(channel)
            env.cli("audit", "checkpoint")
            cut = [sign(channel, f"cut-{n}") for n in range(2)]
    finally:
        daemon.kill()  # as a crash would: the daemon signs no checkpoint and records no audit.gap
    live = env.cli("audit", "verify", "--live", "--public-key", str(public), check=False)
    assert live.returncode == 0 and "2 event(s) after the last checkpoint are not covered" in live.stdout, live.stdout
    with sqlite3.connect(db, timeout=30) as conn:
        (covered,) = conn.execute("SELECT max(seq) FROM audit_checkpoints").fetchone()
        assert conn.execute("DELETE FROM audit_events WHERE seq > ?", (covered,)).rowcount == 2

    live = env.cli("audit", "verify", "--live", "--public-key", str(public), check=False)
    assert live.returncode == 1 and live.stdout.startswith("FAILED:") and not live.stderr, live.stdout + live.stderr
    for response in cut:
        serial = response.serial.lower()
        assert (
            f"the certificates table holds serial {serial} (device {response.device_id}, issued by CA key ca-root-1), but no "
            "event records its issuance" in live.stdout
        ), live.stdout
    # The issuance events the log still holds, and the rows they name, are not reported.
    assert live.stdout.count("no event records its issuance") == 2, live.stdout
