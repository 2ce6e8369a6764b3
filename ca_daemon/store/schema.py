"""The tables and their versioned migrations, one definition for SQLite and PostgreSQL.

Migrations are a linear list of steps, each applied once in its own transaction and
recorded in `schema_migrations`. Alembic would add a second configuration system and a
migration-script directory for what is, here, a short ordered list of DDL statements
that must run identically on both dialects; this stays in one file instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    insert,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import Connection

metadata = MetaData()

schema_migrations = Table(
    "schema_migrations",
    metadata,
    Column("version", Integer, primary_key=True),
    Column("description", String(200), nullable=False),
    Column("applied_at", DateTime(timezone=True), nullable=False),
)

ca_keys = Table(
    "ca_keys",
    metadata,
    Column("key_id", String(128), primary_key=True),
    Column("pkcs11_uri", String(512), nullable=False),
    Column("spec", String(32), nullable=False),
    Column("public_key_der", LargeBinary, nullable=False, unique=True),
    Column("status", String(16), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("certificate_der", LargeBinary),
    # Concatenated DER of the parents, nearest first (see model.CaKey.chain_der).
    Column("chain_der", LargeBinary, nullable=False, default=b""),
    # Version 9 (see _add_v9): when an emergency switch stopped the key's issuance, before revoking what it signed.
    Column("halted_at", DateTime(timezone=True)),
)

# Serials are stored as lowercase hex without leading zeros: they exceed 64 bits.
certificates = Table(
    "certificates",
    metadata,
    Column("serial", String(64), primary_key=True),
    Column("issuer_key_id", String(128), ForeignKey("ca_keys.key_id"), nullable=False),
    Column("device_id", String(256), nullable=False),
    Column("profile", String(128), nullable=False),
    Column("subject", Text, nullable=False),
    Column("not_before", DateTime(timezone=True), nullable=False),
    Column("not_after", DateTime(timezone=True), nullable=False),
    Column("der", LargeBinary, nullable=False),
    Column("csr_sha256", LargeBinary, nullable=False),
    Column("public_key_sha256", LargeBinary, nullable=False),
    Column("request_id", String(256), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    # Version 6 (see _add_v6); a database created before it gets the column from that step.
    Column("caller", String(256), nullable=False, server_default=""),
    UniqueConstraint("request_id", name="uq_certificates_request_id"),
    Index("ix_certificates_device_id", "device_id"),
    Index("ix_certificates_public_key", "public_key_sha256"),
    Index("ix_certificates_issuer_not_after", "issuer_key_id", "not_after"),
)

revocations = Table(
    "revocations",
    metadata,
    Column("serial", String(64), ForeignKey("certificates.serial"), primary_key=True),
    Column("issuer_key_id", String(128), ForeignKey("ca_keys.key_id"), nullable=False),
    Column("reason", Integer, nullable=False),
    Column("revoked_at", DateTime(timezone=True), nullable=False),
    Column("invalidity_date", DateTime(timezone=True)),
    Column("revoked_by", String(256), nullable=False, default=""),
    # Set when a certificateHold is lifted; the row stays so the next delta can say removeFromCRL.
    Column("lifted_at", DateTime(timezone=True)),
    # A per-issuer change counter: a delta CRL covers the changes after its base.
    Column("change_seq", BigInteger, nullable=False, default=0),
    # The certificate's notAfter, copied so the base CRL can drop expired entries without a join.
    Column("not_after", DateTime(timezone=True), nullable=False),
    # The revokedCertificate entry, DER-encoded once at revocation: a full CRL is their concatenation.
    Column("entry_der", LargeBinary, nullable=False),
    Index("ix_revocations_issuer_change", "issuer_key_id", "change_seq"),
)

# Every published CRL of every issuer (the last few are kept; see SqlStore.store_crl).
# One CRL number sequence per issuer, shared by full and delta CRLs.
crls = Table(
    "crls",
    metadata,
    Column("issuer_key_id", String(128), ForeignKey("ca_keys.key_id"), primary_key=True),
    Column("crl_number", BigInteger, primary_key=True),
    Column("is_delta", Boolean, nullable=False),
    Column("base_crl_number", BigInteger),
    Column("this_update", DateTime(timezone=True), nullable=False),
    Column("next_update", DateTime(timezone=True), nullable=False),
    # The revocations.change_seq this CRL is complete up to (a delta after it lists what is newer).
    Column("change_seq", BigInteger, nullable=False, default=0),
    Column("entries", Integer, nullable=False, default=0),
    Column("der", LargeBinary, nullable=False),
    Column("published_at", DateTime(timezone=True), nullable=False),
    # The final CRL of a retired key (version 8; a database created at version 8 or later has it from here).
    Column("is_final", Boolean, nullable=False, default=False),
    Index("ix_crls_issuer_kind_number", "issuer_key_id", "is_delta", "crl_number"),
)

# The outcome of the last CRL publication attempt per issuer, so every worker's health
# check can show a CRL that failed its self-check (only one process publishes).
crl_publish_status = Table(
    "crl_publish_status",
    metadata,
    Column("issuer_key_id", String(128), ForeignKey("ca_keys.key_id"), primary_key=True),
    Column("ok", Boolean, nullable=False),
    Column("message", Text, nullable=False, default=""),
    Column("attempted_at", DateTime(timezone=True), nullable=False),
)

audit_events = Table(
    "audit_events",
    metadata,
    # INTEGER on SQLite so the column is the rowid and autoincrements.
    Column("seq", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("time", DateTime(timezone=True), nullable=False),
    Column("actor", String(256), nullable=False),
    Column("action", String(64), nullable=False),
    Column("outcome", String(32), nullable=False),
    Column("serial", String(64)),
    Column("device_id", String(256), nullable=False, default=""),
    Column("key_id", String(128), nullable=False, default=""),
    Column("request_digest", LargeBinary, nullable=False, default=b""),
    Column("reason", Text, nullable=False, default=""),
    Column("details", Text, nullable=False, default="{}"),
    # Filled by the hash-chained audit log; NULL until then.
    Column("prev_hash", LargeBinary),
    Column("hash", LargeBinary),
    Index("ix_audit_events_time", "time"),
)


def _create_v1(conn: Connection) -> None:
    for table in (ca_keys, certificates, revocations, crls, crl_publish_status, audit_events):
        table.create(conn)


# -- version 2: the hash-chained audit log (issue 6) ------------------------

# Signed checkpoints of the audit chain: the head (seq, hash) and the event count,
# signed with the audit key in the HSM (see ca_daemon/audit_hash.py for the encoding).
audit_checkpoints = Table(
    "audit_checkpoints",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("seq", BigInteger, nullable=False),
    Column("count", BigInteger, nullable=False),
    Column("head_hash", LargeBinary, nullable=False),
    Column("time", DateTime(timezone=True), nullable=False),
    Column("key_id", String(128), nullable=False),
    Column("signature", LargeBinary, nullable=False),
    Index("ix_audit_checkpoints_seq", "seq"),
)

# Client certificates for the gRPC interface, issued by the internal mTLS CA (`ca-daemon mtls`).
# Only certificates: their private keys are made by the client side and never stored.
mtls_certificates = Table(
    "mtls_certificates",
    metadata,
    Column("serial", String(64), primary_key=True),
    Column("name", String(256), nullable=False),
    Column("role", String(32), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("not_after", DateTime(timezone=True), nullable=False),
    Column("der", LargeBinary, nullable=False),
    Column("issued_at", DateTime(timezone=True), nullable=False),
    Column("revoked_at", DateTime(timezone=True)),
    Column("revocation_reason", Integer),
)


def _create_v2(conn: Connection) -> None:
    """New tables, then chain the audit events written before the chain existed (in seq order)."""
    from sqlalchemy import select, update

    from ca_daemon.audit_hash import GENESIS, event_hash

    audit_checkpoints.create(conn)
    mtls_certificates.create(conn)
    prev = GENESIS
    rows = conn.execute(select(audit_events).order_by(audit_events.c.seq)).all()
    for row in rows:
        digest = event_hash(dict(row._mapping), row.seq, prev)
        conn.execute(update(audit_events).where(audit_events.c.seq == row.seq).values(prev_hash=prev, hash=digest))
        prev = digest


# -- version 3: CA key rotation under dual control (issue 7) -------------------

# One row per officer approval of a key action ("activate", "retire", "destroy", "emergency").
# An action runs once two distinct officers approved the same (action, key_id, successor_key_id)
# within the configured window; executed_at then marks the approvals it consumed.
key_approvals = Table(
    "key_approvals",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("action", String(16), nullable=False),
    Column("key_id", String(128), ForeignKey("ca_keys.key_id"), nullable=False),
    Column("successor_key_id", String(128), nullable=False, default=""),
    Column("officer", String(256), nullable=False),
    Column("approved_at", DateTime(timezone=True), nullable=False),
    Column("executed_at", DateTime(timezone=True)),
    Index("ix_key_approvals_action_key", "action", "key_id", "executed_at"),
)

# When each CA key was published (certificate installed), activated, superseded, retired, destroyed.
ca_key_lifecycle = Table(
    "ca_key_lifecycle",
    metadata,
    Column("key_id", String(128), ForeignKey("ca_keys.key_id"), primary_key=True),
    Column("published_at", DateTime(timezone=True)),
    Column("activated_at", DateTime(timezone=True)),
    Column("superseded_at", DateTime(timezone=True)),
    Column("retired_at", DateTime(timezone=True)),
    Column("destroyed_at", DateTime(timezone=True)),
    Column("compromised_at", DateTime(timezone=True)),
)


def _create_v3(conn: Connection) -> None:
    key_approvals.create(conn)
    ca_key_lifecycle.create(conn)


# -- version 4: CRL number floors (restores from older backups) ------------------

# The number every later CRL of an issuer must exceed, besides those in `crls`: after a
# restore from an older backup, relying parties may hold CRLs numbered above anything the
# restored database has published, and RFC 5280 CRL numbers never go back.
crl_number_floors = Table(
    "crl_number_floors",
    metadata,
    Column("issuer_key_id", String(128), primary_key=True),
    Column("floor", BigInteger, nullable=False),
    Column("set_at", DateTime(timezone=True), nullable=False),
    Column("set_by", String(256), nullable=False),
)


def _create_v4(conn: Connection) -> None:
    crl_number_floors.create(conn)


# -- version 5: per-caller issuance quotas ---------------------------------------

# Certificates issued per caller per clock hour (hour = Unix time // 3600). A quota is
# checked against the current hour's count plus the previous hour's, weighted by how much
# of the previous hour still lies within the last 60 minutes (a sliding-window estimate).
# Version 7 replaces it with counts per minute and drops it.
caller_issuance = Table(
    "caller_issuance",
    metadata,
    Column("caller", String(256), primary_key=True),
    Column("hour", BigInteger, primary_key=True),
    Column("issued", BigInteger, nullable=False),
)


def _create_v5(conn: Connection) -> None:
    caller_issuance.create(conn)


# -- version 6: the caller of each certificate ------------------------------------

# A request_id is one namespace for all callers; knowing who used it lets a replay be refused
# to another caller without telling it anything about the first caller's certificate.


def _add_v6(conn: Connection) -> None:
    # A database created at version 6 or later has the column from `certificates` above.
    if "caller" not in {column["name"] for column in inspect(conn).get_columns("certificates")}:
        conn.execute(text("ALTER TABLE certificates ADD COLUMN caller VARCHAR(256) NOT NULL DEFAULT ''"))


# -- version 7: quota counts per minute --------------------------------------------

# Certificates issued per caller per minute (minute = Unix time // 60). A quota counts in full
# every minute that overlaps the last 60 minutes, so no 60 minutes ever hold more certificates
# of a caller than its quota, and a certificate counts for 60 to 61 minutes. Version 5's
# hourly counts weighted the previous hour by its part in the window, as if its issuance
# had been spread evenly: a caller who bunched it at the end of an hour could have up to
# twice its quota within 60 minutes.
caller_issuance_by_minute = Table(
    "caller_issuance_by_minute",
    metadata,
    Column("caller", String(256), primary_key=True),
    Column("minute", BigInteger, primary_key=True),
    Column("issued", BigInteger, nullable=False),
)


def _create_v7(conn: Connection) -> None:
    caller_issuance_by_minute.create(conn)
    now_minute = int(time.time() // 60)
    # The hourly counts still in a window (this hour and the previous one) move to the last
    # minute of their hour, or this minute: no later than any of their certificates, so each
    # counts as long as it could lie within the last 60 minutes.
    counts: dict[tuple[str, int], int] = {}
    for caller, hour, issued in conn.execute(select(caller_issuance.c.caller, caller_issuance.c.hour, caller_issuance.c.issued)):
        if hour >= now_minute // 60 - 1:
            minute = min(hour * 60 + 59, now_minute)
            counts[caller, minute] = counts.get((caller, minute), 0) + issued
    if counts:
        rows = [{"caller": caller, "minute": minute, "issued": issued} for (caller, minute), issued in counts.items()]
        conn.execute(insert(caller_issuance_by_minute), rows)
    caller_issuance.drop(conn)


# -- version 8: final CRLs --------------------------------------------------------

# A retiring key's final CRL (valid until its CA certificate expires, no delta after it) must
# stay its last: a scheduled CRL stored after it, in the moment before the key is marked
# retired, would replace it with one that expires within days.


def _add_v8(conn: Connection) -> None:
    if "is_final" not in {column["name"] for column in inspect(conn).get_columns("crls")}:
        false = "0" if conn.dialect.name == "sqlite" else "FALSE"
        conn.execute(text(f"ALTER TABLE crls ADD COLUMN is_final BOOLEAN NOT NULL DEFAULT {false}"))


# -- version 9: an emergency stops the compromised key's issuance first ----------------

# The emergency switch revokes what the compromised key signed, then activates the successor. A
# certificate committed while the revocation pass ran was handed out and revoked moments later.
# halted_at is set (in its own transaction, before that pass) and read by the group commit with the
# key's status, so from then on nothing the key signs is stored.


def _add_v9(conn: Connection) -> None:
    if "halted_at" not in {column["name"] for column in inspect(conn).get_columns("ca_keys")}:
        kind = "DATETIME" if conn.dialect.name == "sqlite" else "TIMESTAMP WITH TIME ZONE"
        conn.execute(text(f"ALTER TABLE ca_keys ADD COLUMN halted_at {kind}"))


# -- version 10: the URLs each key's certificates carry --------------------------------

# A certificate carries its CRL Distribution Point and AIA caIssuers URLs for life, but the daemon served only the
# URLs of the configuration it runs: after [ca] crl_distribution_points moved, the devices issued before pointed
# relying parties at a path that answered 404, and those that require a CRL refused them. Each URL a key's
# certificates were given is recorded before the first of them is signed, and the CRL publisher serves every one.
key_urls = Table(
    "key_urls",
    metadata,
    Column("key_id", String(128), ForeignKey("ca_keys.key_id"), primary_key=True),
    # "crl" (CRL Distribution Points: the key's full CRL) or "ca_issuers" (AIA caIssuers: the key's certificate).
    Column("kind", String(16), primary_key=True),
    Column("url", String(2048), primary_key=True),
    Column("recorded_at", DateTime(timezone=True), nullable=False),
)


def _create_v10(conn: Connection) -> None:
    key_urls.create(conn, checkfirst=True)


# (version, description, step). Append only: a released step is never edited.
MIGRATIONS: list[tuple[int, str, Callable[[Connection], None]]] = [
    (1, "ca keys, certificates, revocations, crls, audit events", _create_v1),
    (2, "audit chain checkpoints, mTLS client certificates; chain existing audit events", _create_v2),
    (3, "key rotation: officer approvals and CA key life-cycle times", _create_v3),
    (4, "CRL number floors, so CRL numbers never go back after a restore", _create_v4),
    (5, "per-caller issuance counts for quotas", _create_v5),
    (6, "the caller of each certificate, for replays by request_id", _add_v6),
    (7, "per-caller issuance counts per minute, so a quota holds for any 60 minutes", _create_v7),
    (8, "final CRLs of retired keys, which no later CRL may follow", _add_v8),
    (9, "a compromised key's issuance stopped before the emergency's revocation pass", _add_v9),
    (10, "the CRL and caIssuers URLs each key's certificates carry, all served", _create_v10),
]
LATEST_VERSION = MIGRATIONS[-1][0]


def unknown_version_reason(version: int) -> str | None:
    """Why this release must not use a database at schema version, or None if it may.

    A newer release's migrations are not undone by running an older one: an older release
    would write rows its successor's schema does not expect (columns it adds left at their
    defaults, tables it adds left behind) and read new states as ones it knows, so a
    downgrade is refused rather than served.
    """
    if version <= LATEST_VERSION:
        return None
    return (
        f"the database's schema is at version {version}, newer than this release of ca-daemon knows (up to {LATEST_VERSION}): "
        "a newer release wrote it; run that release (or a newer one), or restore a backup this release made"
    )
