"""The domain's records: frozen dataclasses, shared by every layer and free of I/O."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime


class KeySpec(enum.Enum):
    """The CA key algorithms the daemon can generate and use in a token."""

    EC_P256 = "ec-p256"
    EC_P384 = "ec-p384"
    RSA_2048 = "rsa-2048"
    RSA_3072 = "rsa-3072"
    RSA_4096 = "rsa-4096"
    ED25519 = "ed25519"

    @property
    def family(self) -> str:
        """ "ec", "rsa" or "ed25519"."""
        return self.value.split("-")[0]

    @property
    def rsa_bits(self) -> int:
        if self.family != "rsa":
            raise ValueError(f"{self.value} is not an RSA key")
        return int(self.value.split("-")[1])


class KeyStatus(enum.Enum):
    """Where a CA key is in its life: generated, signing, or kept only for its CRLs."""

    PENDING = "pending"
    ACTIVE = "active"
    # Replaced by a newer key: signs no certificates, still signs its own CRLs (see rotation.py).
    SUPERSEDED = "superseded"
    RETIRED = "retired"
    # Deleted from the token after retirement; its certificates and CRLs stay in the store.
    DESTROYED = "destroyed"


class RevocationReason(enum.IntEnum):
    """RFC 5280 CRLReason codes (7 is unused; 8, removeFromCRL, appears only in deltas)."""

    UNSPECIFIED = 0
    KEY_COMPROMISE = 1
    CA_COMPROMISE = 2
    AFFILIATION_CHANGED = 3
    SUPERSEDED = 4
    CESSATION_OF_OPERATION = 5
    CERTIFICATE_HOLD = 6
    PRIVILEGE_WITHDRAWN = 9


@dataclass(frozen=True)
class CaKey:
    """A CA signing key that lives in the token, and the certificate that names it."""

    key_id: str
    pkcs11_uri: str
    spec: KeySpec
    public_key_der: bytes
    status: KeyStatus
    created_at: datetime
    certificate_der: bytes | None = None
    # Parents of certificate_der up to the root, nearest first; empty for a self-signed root.
    chain_der: tuple[bytes, ...] = ()
    # When an emergency halted the key (ca_keys.halted_at; never undone): from then on nothing it signs is stored.
    # An active key that is halted refuses every Sign until the emergency switches to its successor.
    halted_at: datetime | None = None


@dataclass(frozen=True)
class CertificateRequest:
    """A Sign call as the authority sees it, before any decision."""

    csr: bytes
    profile: str
    request_id: str
    caller: str


# The profile of the CA link certificates a root roll-over makes (rotation.py; stored with device ID
# `ca-link:SUBJECT_KEY`): the CA's own certificates beside the devices', not issued under any configured profile.
LINK_PROFILE = "ca-link"


def link_device_id(subject_key_id: str) -> str:
    """The device ID a CA link certificate is stored under: the CA key it certifies."""
    return f"{LINK_PROFILE}:{subject_key_id}"


def certified_key_id(link: IssuedCertificate) -> str:
    """The CA key a link certificate certifies (its device ID, see link_device_id)."""
    return link.device_id.removeprefix(f"{LINK_PROFILE}:")


@dataclass(frozen=True)
class IssuedCertificate:
    """A certificate the CA signed and recorded."""

    serial: int
    issuer_key_id: str
    device_id: str
    profile: str
    subject: str
    not_before: datetime
    not_after: datetime
    der: bytes
    csr_sha256: bytes
    public_key_sha256: bytes
    request_id: str
    created_at: datetime
    # Who asked for it (the caller's identity); "" for link certificates and for rows of schema 5 and before.
    caller: str = ""


@dataclass(frozen=True)
class Revocation:
    """The revocation of one certificate."""

    serial: int
    issuer_key_id: str
    reason: RevocationReason
    revoked_at: datetime
    invalidity_date: datetime | None = None


@dataclass(frozen=True)
class AuditEvent:
    """One line of the audit log: who did what to which object, and how it ended."""

    time: datetime
    actor: str
    action: str
    outcome: str
    serial: int | None = None
    device_id: str = ""
    key_id: str = ""
    request_digest: bytes = b""
    reason: str = ""
    details: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PublishedCrl:
    """A CRL as signed, checked and recorded: a full (base) CRL or a delta on a base."""

    issuer_key_id: str
    crl_number: int
    base_crl_number: int | None
    this_update: datetime
    next_update: datetime
    # The revocation change counter the CRL is complete up to (see store.schema.revocations).
    change_seq: int
    entries: int
    der: bytes
    published_at: datetime

    @property
    def is_delta(self) -> bool:
        return self.base_crl_number is not None
