"""CA key rotation records: officer approvals, key life-cycle times and link certificates.

Kept beside sql.py (same engine, same transactions, audit events appended by
`SqlStore._insert_audit` in the same transaction as the change they describe) so the hot
issuance path in sql.py and the rare ceremony path can change independently.

Link certificates (one root generation certifying the other's key) are stored in the
`certificates` table with profile `LINK_PROFILE` and device ID `ca-link:SUBJECT_KEY`, so
they can be revoked and appear on their issuer's CRL like any certificate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, func, insert, select, update

from ca_daemon.errors import AlreadyExists, FailedPrecondition, NotFound
from ca_daemon.model import (
    LINK_PROFILE,
    AuditEvent,
    CaKey,
    IssuedCertificate,
    KeyStatus,
    RevocationReason,
    certified_key_id,
    link_device_id,
)
from ca_daemon.store.locks import LockSpace, xact_lock
from ca_daemon.store.schema import ca_key_lifecycle, ca_keys, certificates, key_approvals, revocations
from ca_daemon.store.sql import SqlStore, _certificate, _certificate_values, serial_hex, void_open_approvals

# record_link's refusal: the link's issuer or subject key was halted by a key emergency.
KEY_HALTED = "key-halted"

LIFECYCLE_FIELDS = ("published_at", "activated_at", "superseded_at", "retired_at", "destroyed_at", "compromised_at")


@dataclass(frozen=True)
class StatusChange:
    """One key's move from one status to another, and the life-cycle time it sets."""

    key_id: str
    expected: tuple[KeyStatus, ...]
    new_status: KeyStatus
    lifecycle_field: str


@dataclass(frozen=True)
class Lifecycle:
    key_id: str
    times: dict[str, datetime | None]

    def get(self, name: str) -> datetime | None:
        return self.times.get(name)


class RotationStore:
    """Approvals, life-cycle times and link certificates over a SqlStore."""

    def __init__(self, store: SqlStore) -> None:
        self._store = store

    # -- life cycle ----------------------------------------------------------

    def lifecycle(self, key_id: str) -> Lifecycle:
        with self._store._connect() as conn:
            row = conn.execute(select(ca_key_lifecycle).where(ca_key_lifecycle.c.key_id == key_id)).first()
        times = {f: _utc(row._mapping[f]) if row is not None else None for f in LIFECYCLE_FIELDS}
        return Lifecycle(key_id, times)

    def unfinished_emergency(self, key: CaKey) -> str | None:
        """The successor named by the emergency that halted key and has not switched yet ("" if no approval names one
        any more); None if the key is not halted or its emergency completed (compromised_at set)."""
        if key.halted_at is None or self.lifecycle(key.key_id).get("compromised_at") is not None:
            return None
        with self._store._connect() as conn:
            row = conn.execute(
                select(key_approvals.c.successor_key_id)
                .where(key_approvals.c.action == "emergency", key_approvals.c.key_id == key.key_id, key_approvals.c.executed_at.is_(None))
                .order_by(key_approvals.c.approved_at.desc())
                .limit(1)
            ).first()
        return str(row.successor_key_id) if row is not None else ""

    def mark_published(self, key_id: str, at: datetime) -> None:
        """Start the key's pre-publication period (its certificate is now served), once."""
        with self._store._begin() as conn:
            _set_time(conn, key_id, "published_at", at, overwrite=False)

    # -- approvals -----------------------------------------------------------

    def approve(
        self, action: str, key_id: str, successor_key_id: str, officer: str, now: datetime, window: timedelta, audit: AuditEvent
    ) -> list[str]:
        """Record one officer's approval (and its audit event); return the distinct officers whose approvals are live."""
        with self._store._begin() as conn:
            if conn.execute(select(ca_keys.c.key_id).where(ca_keys.c.key_id == key_id)).first() is None:
                raise NotFound(f"no CA key {key_id!r}; `ca-daemon key list` shows the known keys", rule="key", field="key_id")
            conn.execute(
                insert(key_approvals).values(
                    action=action, key_id=key_id, successor_key_id=successor_key_id, officer=officer, approved_at=now, executed_at=None
                )
            )
            self._store._insert_audit(conn, [audit])
            return _live_officers(conn, action, key_id, successor_key_id, now, window)

    def live_officers(self, action: str, key_id: str, successor_key_id: str, now: datetime, window: timedelta) -> list[str]:
        with self._store._connect() as conn:
            return _live_officers(conn, action, key_id, successor_key_id, now, window)

    def halt(self, key_id: str, successor_key_id: str, now: datetime, window: timedelta, audit: AuditEvent) -> bool:
        """Stop storing what key_id signs (an emergency's first step), leaving the approvals live; True if it was not yet.

        Refused (nothing changes) unless two distinct officers still have live emergency approvals
        (another execution that switched already consumed them) and the key is active or superseded.
        The key's row is locked FOR NO KEY UPDATE, as the switch locks it: on PostgreSQL (READ COMMITTED) this
        waits for every group commit that read the key's status FOR SHARE, so the revocation pass that
        follows finds their certificates; a commit after it, or waiting for it, reads halted_at. On
        SQLite the write lock orders the two. The approvals stay live, so if the process dies before
        the switch, the officers' retry completes the emergency.
        """
        with self._store._begin() as conn:
            officers = _live_officers(conn, "emergency", key_id, successor_key_id, now, window)
            if len(officers) < 2:
                raise FailedPrecondition(
                    f"emergency of {key_id} needs approvals from 2 distinct officers within the window; live: {len(officers)}",
                    rule="dual-control",
                )
            # FOR NO KEY UPDATE, as execute (below) locks keys: FOR UPDATE also waits for the foreign-key checks of rows
            # inserted under the key (revocations, CRLs), and a revocation under two keys deadlocked with it.
            locked = select(ca_keys.c.status, ca_keys.c.halted_at).where(ca_keys.c.key_id == key_id).with_for_update(key_share=True)
            row = conn.execute(locked).first()
            if row is None:
                raise NotFound(f"no CA key {key_id!r}", rule="key", field="key_id")
            if KeyStatus(row.status) not in (KeyStatus.ACTIVE, KeyStatus.SUPERSEDED):
                raise FailedPrecondition(f"CA key {key_id} is {row.status}; emergency needs it active or superseded", rule="key-status")
            if row.halted_at is None:
                conn.execute(update(ca_keys).where(ca_keys.c.key_id == key_id).values(halted_at=now))
            self._store._insert_audit(conn, [audit])
            return row.halted_at is None

    def execute(
        self,
        action: str,
        key_id: str,
        successor_key_id: str,
        now: datetime,
        window: timedelta,
        changes: Sequence[StatusChange],
        audit: AuditEvent,
        *,
        required: int = 2,
        revocations_as_of: int | None = None,
    ) -> None:
        """Consume the live approvals and apply the status changes in one transaction.

        Refused (nothing changes) unless `required` distinct officers still have live,
        unconsumed approvals, and every key is in a status its change expects: a second
        process executing the same approvals at the same moment finds them consumed.
        With revocations_as_of (a retirement: the change sequence its final CRL covers), it is
        refused too if a revocation of key_id's certificates was recorded since.
        """
        with self._store._begin() as conn:
            if revocations_as_of is not None:
                xact_lock(conn, LockSpace.REVOCATIONS, key_id)  # the lock every revocation of key_id's certificates takes
                if self._store._max_change_seq(conn, key_id) != revocations_as_of:
                    raise FailedPrecondition(
                        f"a revocation of {key_id}'s certificates was recorded while its final CRL was being signed; "
                        "nothing changed: approve again to retire it with a final CRL that includes it",
                        rule="final-crl",
                    )
            officers = _live_officers(conn, action, key_id, successor_key_id, now, window)
            if len(officers) < required:
                raise FailedPrecondition(
                    f"{action} of {key_id} needs approvals from {required} distinct officers within the window; live: {len(officers)}",
                    rule="dual-control",
                )
            # The keys' rows locked in key order, as a group commit locks its issuer keys FOR SHARE (SqlStore.
            # record_unique_issuances): a commit in flight finishes first, and one that comes later sees the new status.
            # FOR NO KEY UPDATE (what the UPDATE takes anyway), not FOR UPDATE: that one also conflicts with the FOR KEY
            # SHARE lock PostgreSQL's foreign-key check takes for every certificate, revocation or CRL row inserted, and
            # a revocation of certificates of both keys deadlocked with the switch.
            statuses = {
                row.key_id: row.status
                for row in conn.execute(
                    select(ca_keys.c.key_id, ca_keys.c.status)
                    .where(ca_keys.c.key_id.in_(sorted({c.key_id for c in changes})))
                    .order_by(ca_keys.c.key_id)
                    .with_for_update(key_share=True)
                )
            }
            for change in changes:
                status = statuses.get(change.key_id)
                if status is None:
                    raise NotFound(f"no CA key {change.key_id!r}", rule="key", field="key_id")
                if KeyStatus(status) not in change.expected:
                    raise FailedPrecondition(
                        f"CA key {change.key_id} is {status}; {action} needs it " + " or ".join(s.value for s in change.expected),
                        rule="key-status",
                    )
                conn.execute(update(ca_keys).where(ca_keys.c.key_id == change.key_id).values(status=change.new_status.value))
                _set_time(conn, change.key_id, change.lifecycle_field, now, overwrite=True)
            # Lapsed approvals of the same action are consumed too: a later, longer window must not revive them.
            conn.execute(update(key_approvals).where(_live(action, key_id, successor_key_id, now, None)).values(executed_at=now))
            # So is every open approval of a key whose state changed: it was given for the key as it was.
            for change in changes:
                void_open_approvals(conn, change.key_id, now)
            self._store._insert_audit(conn, [audit])

    # -- certificates of a key -----------------------------------------------

    def unexpired_unrevoked(self, key_id: str, now: datetime, *, leaves_only: bool = True) -> list[int]:
        """Serials of the key's certificates still valid at now and not (finally) revoked."""
        unrevoked = (revocations.c.serial.is_(None)) | (revocations.c.lifted_at.is_not(None))
        return self._unexpired(key_id, now, unrevoked, *([certificates.c.profile != LINK_PROFILE] if leaves_only else []))

    def unexpired_on_hold(self, key_id: str, now: datetime) -> list[int]:
        """Serials of the key's certificates still valid at now and on hold (certificateHold, not lifted)."""
        return self._unexpired(
            key_id, now, revocations.c.reason == RevocationReason.CERTIFICATE_HOLD.value, revocations.c.lifted_at.is_(None)
        )

    def _unexpired(self, key_id: str, now: datetime, *conditions: ColumnElement[bool]) -> list[int]:
        """Serials of the key's certificates still valid at now that meet conditions (on them and their revocation)."""
        stmt = (
            select(certificates.c.serial)
            .select_from(certificates.outerjoin(revocations, revocations.c.serial == certificates.c.serial))
            .where(certificates.c.issuer_key_id == key_id)
            .where(certificates.c.not_after > self._store._bind_time(now))
            .where(*conditions)
        )
        with self._store._connect() as conn:
            return [int(r.serial, 16) for r in conn.execute(stmt)]

    def compromise_revocations(self, key_id: str) -> tuple[int, int]:
        """How many certificates key_id signed are revoked for its compromise (cACompromise: leaves and the links it
        signed), and how many link certificates certifying it are (keyCompromise), whoever revoked them.

        An emergency's outcome as a whole: two executions at once each count only what they revoked themselves, and the one
        that switches may have found everything revoked already by the other (or by an officer's Revoke).
        """
        signed = (
            select(func.count())
            .select_from(revocations)
            .where(revocations.c.issuer_key_id == key_id, revocations.c.reason == RevocationReason.CA_COMPROMISE.value)
        )
        certifying = (
            select(func.count())
            .select_from(certificates.join(revocations, revocations.c.serial == certificates.c.serial))
            .where(certificates.c.device_id == link_device_id(key_id), certificates.c.profile == LINK_PROFILE)
            .where(revocations.c.reason == RevocationReason.KEY_COMPROMISE.value)
        )
        with self._store._connect() as conn:
            return int(conn.execute(signed).scalar_one()), int(conn.execute(certifying).scalar_one())

    def record_link(self, link: IssuedCertificate, audit: AuditEvent) -> None:
        """Store a link certificate; FailedPrecondition (rule key-halted) if its issuer or subject key is halted.

        A key emergency halts the compromised key, then revokes the links certifying it that it lists: a link made
        with that key after the listing was left in force, and it chains the compromised key's certificates to the
        other root. The keys' rows are read FOR SHARE, so on PostgreSQL this waits for a halt in flight (which
        locks the row), and a halt waits for this: either the halt finds this link or this finds the key halted.
        """
        with self._store._begin() as conn:
            keys = (link.issuer_key_id, certified_key_id(link))
            locked = select(ca_keys.c.key_id, ca_keys.c.halted_at).where(ca_keys.c.key_id.in_(keys)).with_for_update(read=True)
            halted = sorted(str(row.key_id) for row in conn.execute(locked) if row.halted_at is not None)
            if halted:
                raise FailedPrecondition(
                    f"CA key {halted[0]} is halted by a key emergency (compromised): no link certificate is made with it",
                    rule=KEY_HALTED,
                )
            if conn.execute(select(certificates.c.serial).where(certificates.c.request_id == link.request_id)).first():
                raise AlreadyExists(f"link certificate {link.request_id} exists", rule="link")
            conn.execute(insert(certificates).values(**_certificate_values(link)))
            self._store._insert_audit(conn, [audit])

    def links(self, keys: Sequence[CaKey] | None = None) -> list[IssuedCertificate]:
        """Every link certificate, oldest first (by device ID, indexed: this runs on every CRL check)."""
        key_ids = [k.key_id for k in keys] if keys is not None else [k.key_id for k in self._store.list_ca_keys()]
        return self._links([link_device_id(k) for k in key_ids])

    def links_certifying(self, subject_key_id: str) -> list[IssuedCertificate]:
        return self._links([link_device_id(subject_key_id)])

    def _links(self, device_ids: list[str]) -> list[IssuedCertificate]:
        if not device_ids:
            return []
        stmt = (
            select(certificates)
            .where(certificates.c.device_id.in_(device_ids))
            .where(certificates.c.profile == LINK_PROFILE)
            .order_by(certificates.c.created_at)
        )
        with self._store._connect() as conn:
            return [_certificate(r) for r in conn.execute(stmt)]


def _live(action: str, key_id: str, successor_key_id: str, now: datetime, window: timedelta | None) -> Any:
    """Unconsumed approvals of one action; with a window, only those inside it: [now - window, now].

    The upper bound matters: an approval stamped ahead of the clock (a host clock stepped back
    since) would otherwise stay live for its offset plus the window. Without a window (consuming),
    every unconsumed one, future-stamped too, so none can come alive later.
    """
    unconsumed = and_(
        key_approvals.c.action == action,
        key_approvals.c.key_id == key_id,
        key_approvals.c.successor_key_id == successor_key_id,
        key_approvals.c.executed_at.is_(None),
    )
    if window is None:
        return unconsumed
    return and_(unconsumed, key_approvals.c.approved_at >= now - window, key_approvals.c.approved_at <= now)


def _live_officers(conn: Any, action: str, key_id: str, successor_key_id: str, now: datetime, window: timedelta) -> list[str]:
    rows = conn.execute(select(key_approvals.c.officer).where(_live(action, key_id, successor_key_id, now, window)).distinct())
    return sorted(str(r.officer) for r in rows)


def _set_time(conn: Any, key_id: str, name: str, at: datetime, *, overwrite: bool) -> None:
    assert name in LIFECYCLE_FIELDS
    row = conn.execute(select(ca_key_lifecycle).where(ca_key_lifecycle.c.key_id == key_id)).first()
    if row is None:
        conn.execute(insert(ca_key_lifecycle).values(key_id=key_id, **{name: at}))
    elif overwrite or row._mapping[name] is None:
        conn.execute(update(ca_key_lifecycle).where(ca_key_lifecycle.c.key_id == key_id).values(**{name: at}))


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


__all__ = ["LINK_PROFILE", "Lifecycle", "RotationStore", "StatusChange", "link_device_id", "serial_hex"]
