"""CRL benchmark: build and sign full CRLs of 10k/100k/1M entries, a 1,000-entry delta, one revocation at 1M.

Everything is real: a SoftHSM token holding the CA key (signing in the token), an SQLite
store with FULL synchronous commits, the daemon's own CrlPublisher and store methods.
Each measurement runs in a fresh child process so its peak RSS (ru_maxrss) covers only
that measurement plus the interpreter and imports (reported as the baseline).

    python -m bench.crl            # all sizes (about a minute of set-up for 1,000,000 rows)
    python -m bench.crl --sizes 10000,100000
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SIZES = (10_000, 100_000, 1_000_000)
DELTA_SIZE = 1_000
REVOCATION_SAMPLES = 50
BULK_REVOCATIONS = 20_000
TARGETS = {"full_1000000_s": 3.0, "full_1000000_mb": 300.0, "delta_ms": 100.0, "revoke_ms": 10.0}


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _sqlite_time(value: datetime) -> str:
    """SQLAlchemy's SQLite DATETIME storage format."""
    return value.astimezone(UTC).replace(tzinfo=None).strftime("%Y-%m-%d %H:%M:%S.%f")


# ---------------------------------------------------------------------------
# Child process work
# ---------------------------------------------------------------------------


def _open(config_path: str) -> tuple[Any, Any, Any]:
    from ca_daemon import app
    from ca_daemon import config as config_module

    config = config_module.load(config_path)
    from ca_daemon.authority import load_active_ca

    hsm = app.connect_hsm(config)
    store = app.connect_store(config)
    load_active_ca(config, hsm, store)  # marks the key active, as the daemon does at start
    return config, hsm, store


def child_setup(state: Path) -> dict[str, Any]:
    """A token, CA key, root certificate and empty database, via the real CLI code."""
    from ca_daemon import cli

    config_path = state / "ca-daemon.toml"
    with contextlib.redirect_stdout(None):
        cli.write_dev_setup(state, config_path, token=f"bench-{os.getpid()}", listen="127.0.0.1:1", workers=1)
        code = cli.main(["--config", str(config_path), "init"])
    if code != 0:
        raise SystemExit("ca-daemon init failed")
    return {"config": str(config_path)}


def child_populate(config_path: str, total: int, *, seq: int) -> dict[str, Any]:
    """Add revoked certificates (rows written with sqlite3 directly: set-up, not measured) until `total` exist."""
    from ca_daemon import config as config_module
    from ca_daemon import crl_der
    from ca_daemon.model import RevocationReason

    config = config_module.load(config_path)
    db = sqlite3.connect(config.store.url.removeprefix("sqlite:///"))
    db.execute("PRAGMA synchronous=OFF")
    (issuer,) = db.execute("SELECT key_id FROM ca_keys").fetchone()
    (have,) = db.execute("SELECT count(*) FROM revocations").fetchone()
    now = datetime.now(UTC).replace(microsecond=0)
    not_after = _sqlite_time(now + timedelta(days=365))
    reasons = [r for r in RevocationReason if r != RevocationReason.CERTIFICATE_HOLD]
    batch = 50_000
    for start in range(have, total, batch):
        certs, revs = [], []
        for i in range(start, min(start + batch, total)):
            serial = int.from_bytes(hashlib.sha256(f"bench-{i}".encode()).digest()[:19], "big") | (1 << 150)
            text = format(serial, "x")
            revoked_at = now - timedelta(seconds=i)
            reason = reasons[i % len(reasons)]
            invalidity = revoked_at - timedelta(days=1) if reason == RevocationReason.KEY_COMPROMISE else None
            certs.append(
                (
                    text,
                    issuer,
                    f"dev-{i}",
                    "device",
                    f"CN=dev-{i}",
                    _sqlite_time(now),
                    not_after,
                    b"\x30\x00",
                    b"",
                    b"",
                    f"r-{i}",
                    _sqlite_time(now),
                )
            )
            entry = crl_der.revoked_entry(serial, revoked_at, reason, invalidity)
            revs.append((text, issuer, int(reason), _sqlite_time(revoked_at), None, "bench", None, seq, not_after, entry))
        db.executemany(
            "INSERT INTO certificates (serial, issuer_key_id, device_id, profile, subject, not_before, not_after, der, csr_sha256,"
            " public_key_sha256, request_id, created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            certs,
        )
        db.executemany(
            "INSERT INTO revocations (serial, issuer_key_id, reason, revoked_at, invalidity_date, revoked_by, lifted_at, change_seq,"
            " not_after, entry_der) VALUES (?,?,?,?,?,?,?,?,?,?)",
            revs,
        )
        db.commit()
    db.close()
    return {"rows": total}


def child_full(config_path: str, mode: str) -> dict[str, Any]:
    """mode "build": read entries from the store, assemble and sign in the HSM. "publish": also self-check and store."""
    config, hsm, store = _open(config_path)
    from ca_daemon.revocation import CrlPublisher

    publisher = CrlPublisher(config, hsm, store)
    issuer = publisher.issuers(datetime.now(UTC))[0]
    baseline = _peak_mb()
    started = time.perf_counter()
    if mode == "build":
        crl = publisher.build(issuer, delta=False, now=datetime.now(UTC).replace(microsecond=0))
    else:
        crl = publisher.publish(issuer, delta=False)
    elapsed = time.perf_counter() - started
    result = {"seconds": elapsed, "peak_mb": _peak_mb(), "baseline_mb": baseline, "entries": crl.entries, "bytes": len(crl.der)}
    hsm.close()
    return result


def child_delta(config_path: str) -> dict[str, Any]:
    """Publish a base, revoke DELTA_SIZE more through the store's revocation path, then time the delta."""
    config, hsm, store = _open(config_path)
    from ca_daemon.model import AuditEvent, IssuedCertificate
    from ca_daemon.revocation import CrlPublisher, encode_entry

    publisher = CrlPublisher(config, hsm, store)
    issuer = publisher.issuers(datetime.now(UTC))[0]
    if store.latest_crl(issuer.key_id, delta=False, with_der=False) is None:
        publisher.publish(issuer, delta=False)
    now = datetime.now(UTC).replace(microsecond=0)
    serials = _issue(store, issuer.key_id, DELTA_SIZE, now, IssuedCertificate, AuditEvent)
    store.record_revocations(
        serials=serials, device_id="", reason=1, revoked_at=now, invalidity_date=None, actor="bench", encode_entry=encode_entry
    )
    baseline = _peak_mb()
    started = time.perf_counter()
    crl = publisher.build(issuer, delta=True, now=now)
    build = time.perf_counter() - started
    publisher.check(issuer, crl)
    checked = time.perf_counter() - started
    hsm.close()
    return {"seconds": build, "with_check_seconds": checked, "entries": crl.entries, "peak_mb": _peak_mb(), "baseline_mb": baseline}


def child_revoke(config_path: str) -> dict[str, Any]:
    """Time single revocations (one durable transaction each, as the Revoke call does) with everything already revoked."""
    from ca_daemon import config as config_module
    from ca_daemon.model import AuditEvent, IssuedCertificate
    from ca_daemon.revocation import encode_entry
    from ca_daemon.store import open_store

    config = config_module.load(config_path)
    store = open_store(config.store.url, sqlite_synchronous=config.store.sqlite_synchronous)
    issuer = store.list_ca_keys()[0].key_id
    now = datetime.now(UTC).replace(microsecond=0)
    serials = _issue(store, issuer, REVOCATION_SAMPLES, now, IssuedCertificate, AuditEvent)
    (count,) = sqlite3.connect(config.store.url.removeprefix("sqlite:///")).execute("SELECT count(*) FROM revocations").fetchone()
    times = []
    for serial in serials:
        started = time.perf_counter()
        store.record_revocations(
            serials=[serial], device_id="", reason=1, revoked_at=now, invalidity_date=None, actor="bench", encode_entry=encode_entry
        )
        times.append(time.perf_counter() - started)
    times.sort()
    return {"already_revoked": count, "median_ms": times[len(times) // 2] * 1000, "max_ms": times[-1] * 1000, "samples": len(times)}


def child_bulk_revoke(config_path: str, count: int) -> dict[str, Any]:
    """Time one revocation of `count` certificates in one transaction, as an emergency switch's revocation pass does."""
    from ca_daemon import config as config_module
    from ca_daemon.model import AuditEvent, IssuedCertificate
    from ca_daemon.revocation import encode_entry
    from ca_daemon.store import open_store

    config = config_module.load(config_path)
    store = open_store(config.store.url, sqlite_synchronous=config.store.sqlite_synchronous)
    issuer = store.list_ca_keys()[0].key_id
    now = datetime.now(UTC).replace(microsecond=0)
    serials = [serial for _ in range(count // 1000) for serial in _issue(store, issuer, 1000, now, IssuedCertificate, AuditEvent)]
    started = time.perf_counter()
    revoked = store.record_revocations(
        serials=serials,
        device_id="",
        reason=2,
        revoked_at=now,
        invalidity_date=None,
        actor="bench",
        encode_entry=encode_entry,
        skip_revoked=True,
    )
    return {"count": len(revoked), "seconds": time.perf_counter() - started}


def _issue(store: Any, issuer: str, count: int, now: datetime, issued_cls: Any, audit_cls: Any) -> list[int]:
    """Record `count` certificates (no signing: only the revocation path is measured)."""
    batch, serials = [], []
    for _ in range(count):
        serial = int.from_bytes(os.urandom(19), "big") | (1 << 150)
        serials.append(serial)
        cert = issued_cls(
            serial=serial,
            issuer_key_id=issuer,
            device_id=f"d-{serial:x}"[:40],
            profile="device",
            subject="CN=x",
            not_before=now,
            not_after=now + timedelta(days=365),
            der=b"\x30\x00",
            csr_sha256=b"",
            public_key_sha256=os.urandom(32),
            request_id=f"{serial:x}",
            created_at=now,
        )
        batch.append((cert, audit_cls(time=now, actor="bench", action="certificate.issue", outcome="issued")))
    store.record_issuances(batch)
    return serials


# ---------------------------------------------------------------------------
# Parent
# ---------------------------------------------------------------------------


def _child(*args: str) -> dict[str, Any]:
    env = dict(os.environ)
    result = subprocess.run(
        [sys.executable, "-m", "bench.crl", "--child", *args], cwd=REPO, capture_output=True, text=True, env=env, check=False
    )
    if result.returncode != 0:
        raise SystemExit(f"bench child {args[0]} failed:\n{result.stdout}\n{result.stderr}")
    parsed: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return parsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.crl")
    parser.add_argument("--sizes", default=",".join(str(s) for s in SIZES))
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        out = {
            "setup": lambda: child_setup(Path(rest[0])),
            "populate": lambda: child_populate(rest[0], int(rest[1]), seq=int(rest[2])),
            "full": lambda: child_full(rest[0], rest[1]),
            "delta": lambda: child_delta(rest[0]),
            "revoke": lambda: child_revoke(rest[0]),
            "bulk-revoke": lambda: child_bulk_revoke(rest[0], int(rest[1])),
        }[kind]()
        print(json.dumps(out))
        return 0
    sizes = [int(s) for s in args.sizes.split(",")]
    print("CRL benchmark (SoftHSM EC P-256 CA key, SQLite FULL sync; each measurement in a fresh process)")
    with tempfile.TemporaryDirectory(prefix="ca-bench-crl-") as tmp:
        config = _child("setup", str(Path(tmp) / "state"))["config"]
        results: dict[str, Any] = {}
        for seq, size in enumerate(sizes, start=1):
            _child("populate", config, str(size), str(seq))
            build = _child("full", config, "build")
            publish = _child("full", config, "publish")
            results[f"full_{size}"] = build
            print(
                f"full CRL, {size:>9,} entries: build+sign {build['seconds']:6.2f} s, peak RSS {build['peak_mb']:6.1f} MB "
                f"(baseline {build['baseline_mb']:.0f} MB, {build['bytes'] / 1e6:.1f} MB DER); "
                f"with self-check and store: {publish['seconds']:6.2f} s, peak RSS {publish['peak_mb']:6.1f} MB"
            )
        delta = _child("delta", config)
        print(
            f"delta CRL, {delta['entries']:>8,} entries: build+sign {delta['seconds'] * 1000:6.1f} ms "
            f"(+ self-check {1000 * (delta['with_check_seconds'] - delta['seconds']):.1f} ms), peak RSS {delta['peak_mb']:.1f} MB"
        )
        revoke = _child("revoke", config)
        print(
            f"revoke one certificate with {revoke['already_revoked']:,} already revoked: median {revoke['median_ms']:.2f} ms, "
            f"max {revoke['max_ms']:.2f} ms over {revoke['samples']} durable transactions"
        )
        bulk = _child("bulk-revoke", config, str(BULK_REVOCATIONS))
        print(
            f"revoke {bulk['count']:,} certificates in one transaction (an emergency switch's pass): {bulk['seconds']:.2f} s, "
            f"{1e6 * bulk['seconds'] / bulk['count']:.0f} us a certificate"
        )
        largest = results.get("full_1000000")
        if largest:
            print(
                f"targets: 1M full <= {TARGETS['full_1000000_s']} s: {largest['seconds']:.2f} s; "
                f"<= {TARGETS['full_1000000_mb']:.0f} MB: {largest['peak_mb']:.0f} MB; delta <= {TARGETS['delta_ms']:.0f} ms: "
                f"{delta['seconds'] * 1000:.1f} ms; revoke <= {TARGETS['revoke_ms']:.0f} ms: {revoke['median_ms']:.2f} ms"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
