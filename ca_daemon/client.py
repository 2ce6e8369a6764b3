"""A small client for programming services and relying parties: sign, revoke, fetch the chain and CRLs.

    from ca_daemon.client import CaClient, TlsOptions
    tls = TlsOptions(ca_bundle="ca-daemon-server-ca.pem", cert="line3.pem", key="line3.key")
    with CaClient("ca.factory.example:50051", tls=tls) as ca:
        issued = ca.sign(csr_pem, request_id="line3-000123")
        open("device.pem", "w").write(issued.certificate_pem + issued.chain_pem)
        ca.revoke(issued.serial, reason="key-compromise")
        full, delta = ca.crl(), ca.crl(delta=True)

Without `tls` the channel is plaintext, for a daemon in development mode on a loopback address.

Retries: a call that fails with UNAVAILABLE (daemon restarting, token briefly gone, store busy)
or DEADLINE_EXCEEDED (the daemon may still complete it: a Sign waiting for the database's write
lock commits after the client gave up) is retried with exponential back-off. That is safe because every retried call is idempotent:
Sign by request_id (the same request_id and CSR return the same certificate, never a second
one), Revoke by serial (a retry that finds the certificate already revoked by its first attempt
returns that revocation), and the reads are reads.

Auditors: `audit_export` writes the audit log with its signed checkpoints in the file format
that `ca-daemon audit verify` checks, from the daemon's API alone (no database access).

Sign answers are checked before they are returned (check_answer): a certificate for another key
than the CSR's, or one its chain did not sign, raises UnexpectedAnswer instead of reaching a device.

A leaf module for users: it imports only the generated protocol code, `cryptography` and the pure
export format (audit_format.py), never the server side.
"""

from __future__ import annotations

import functools
import itertools
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO, TypeVar

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from google.protobuf.timestamp_pb2 import Timestamp

from ca_daemon._proto.ca_daemon.v1 import ca_pb2, ca_pb2_grpc
from ca_daemon.audit_format import checkpoint_record, event_record, interleave, write_export

T = TypeVar("T")

# GetCRL answers with the whole CRL in one message: about 50 bytes an entry, so gRPC's default
# receive limit of 4 MiB refused a full CRL of some 80,000 entries (RESOURCE_EXHAUSTED). A CA key
# whose generation was revoked wholesale lists every one of its certificates.
MAX_RECEIVE_BYTES = 1 << 30

# Events per StreamAuditEvents call of audit_export: each call is bounded, so one deadline fits any log.
_AUDIT_EVENTS_PER_CALL = 20_000
# The largest seq the daemon's stores hold; an after_seq beyond it asks for nothing there can be.
_MAX_SEQ = 2**63 - 1

# RFC 5280 CRLReason names (as in `openssl ca -crl_reason`, with dashes) -> protocol values.
REASONS: dict[str, int] = {
    "unspecified": ca_pb2.REVOCATION_REASON_UNSPECIFIED,
    "key-compromise": ca_pb2.REVOCATION_REASON_KEY_COMPROMISE,
    "ca-compromise": ca_pb2.REVOCATION_REASON_CA_COMPROMISE,
    "affiliation-changed": ca_pb2.REVOCATION_REASON_AFFILIATION_CHANGED,
    "superseded": ca_pb2.REVOCATION_REASON_SUPERSEDED,
    "cessation-of-operation": ca_pb2.REVOCATION_REASON_CESSATION_OF_OPERATION,
    "certificate-hold": ca_pb2.REVOCATION_REASON_CERTIFICATE_HOLD,
    "privilege-withdrawn": ca_pb2.REVOCATION_REASON_PRIVILEGE_WITHDRAWN,
}


@dataclass(frozen=True)
class TlsOptions:
    """mTLS settings: the CA bundle that signed the daemon's server certificate, and this client's certificate and key.

    cert and key are optional only for a daemon that does not ask for a client certificate.
    server_name overrides the name checked in the server certificate (default: the target's host).
    """

    ca_bundle: str | Path
    cert: str | Path | None = None
    key: str | Path | None = None
    server_name: str = ""

    def credentials(self) -> grpc.ChannelCredentials:
        """ValueError, before any connection, for a client certificate the daemon would refuse in its TLS handshake.

        gRPC reports that refusal only as UNAVAILABLE ('failed to connect'), retried in vain: an
        expired certificate is the usual cause on a factory line, and the message says which file.
        """
        if (self.cert is None) != (self.key is None):
            raise ValueError("TLS: give both the client certificate and its key, or neither")
        cert = Path(self.cert).read_bytes() if self.cert is not None else None
        key = Path(self.key).read_bytes() if self.key is not None else None
        if cert is not None and key is not None:
            _check_client_certificate(cert, key, str(self.cert), str(self.key))
        return grpc.ssl_channel_credentials(root_certificates=Path(self.ca_bundle).read_bytes(), private_key=key, certificate_chain=cert)


def _check_client_certificate(cert_pem: bytes, key_pem: bytes, cert_name: str, key_name: str) -> None:
    try:
        leaf = x509.load_pem_x509_certificates(cert_pem)[0]
    except ValueError:
        raise ValueError(f"TLS: {cert_name} holds no PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise ValueError(f"TLS: {key_name} holds no unencrypted PEM private key") from None
    if key.public_key().public_bytes(*_SPKI) != leaf.public_key().public_bytes(*_SPKI):
        raise ValueError(f"TLS: the key in {key_name} is not the key of the certificate in {cert_name}")
    now = datetime.now(UTC)
    renew = "ask an officer for a new one (`ca-daemon mtls issue`)"
    if now > leaf.not_valid_after_utc:
        raise ValueError(f"TLS: the client certificate in {cert_name} expired on {leaf.not_valid_after_utc.isoformat()}; {renew}")
    if now < leaf.not_valid_before_utc:
        raise ValueError(
            f"TLS: the client certificate in {cert_name} is valid only from {leaf.not_valid_before_utc.isoformat()} "
            f"(this host's clock says {now.isoformat(timespec='seconds')}); check the clock"
        )


_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclass(frozen=True)
class Issued:
    certificate_pem: str
    chain_pem: str
    serial: str
    device_id: str
    request_id: str


@dataclass(frozen=True)
class Crl:
    """One published CRL as GetCRL returns it; der is empty when not_modified."""

    der: bytes
    number: int
    not_modified: bool
    this_update: datetime
    next_update: datetime
    delta: bool


@dataclass(frozen=True)
class VerificationCertificate:
    certificate_pem: str
    certificate_der: bytes
    serial: str
    issuer_key_id: str


def reason_value(reason: str | int) -> int:
    """A revocation reason by RFC 5280 name ("key-compromise") or number."""
    if isinstance(reason, int):
        return reason
    try:
        return REASONS[reason.strip().lower().replace("_", "-")]
    except KeyError:
        raise ValueError(f"unknown revocation reason {reason!r}; use one of {', '.join(REASONS)}") from None


class CaClient:
    """A blocking client: mTLS with `tls`, plaintext (development mode) without.

    Thread-safe: a simulator or a programming station may share one client between threads.
    `connections` > 1 opens that many HTTP/2 connections and spreads Sign calls over them:
    the daemon's worker processes share its port by connection (SO_REUSEPORT), so the calls
    of one connection are all served by one worker.
    """

    def __init__(
        self,
        target: str,
        *,
        tls: TlsOptions | None = None,
        timeout: float = 10.0,
        retries: int = 5,
        max_backoff: float = 2.0,
        connections: int = 1,
    ) -> None:
        if connections < 1:
            raise ValueError("connections must be at least 1")
        options: list[tuple[str, str | int]] = [("grpc.max_receive_message_length", MAX_RECEIVE_BYTES)]
        if connections > 1:
            options.append(("grpc.use_local_subchannel_pool", 1))  # else channels to one target share a connection
        if tls is not None and tls.server_name:
            options.append(("grpc.ssl_target_name_override", tls.server_name))
        credentials = tls.credentials() if tls is not None else None

        def open_channel() -> grpc.Channel:
            if credentials is None:
                return grpc.insecure_channel(target, options=options)
            return grpc.secure_channel(target, credentials, options=options)

        self._channels = [open_channel() for _ in range(connections)]
        self._stubs = [ca_pb2_grpc.CertificateAuthorityStub(channel) for channel in self._channels]
        self._stub = self._stubs[0]
        self._turn = itertools.count()
        self._timeout = timeout
        self._retries = retries
        self._max_backoff = max_backoff
        self.retried = 0  # UNAVAILABLE and DEADLINE_EXCEEDED answers retried so far, by every thread (for summaries and tests)
        self._retried_lock = threading.Lock()

    def __enter__(self) -> CaClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def _call(self, call: Callable[[], T], *, after_timeout: bool = True, retries: list[int] | None = None) -> T:
        """Run an idempotent call, retrying UNAVAILABLE (and, unless after_timeout is false, DEADLINE_EXCEEDED) with back-off.

        retries: gets one item per retry of this call, for a caller that must know whether its own call was
        retried (self.retried counts every thread's, and a client may be shared by threads).

        A call that ran out of its deadline may still complete in the daemon: a Sign waiting for the
        database's write lock is committed after the client has given up. Only a retry with the same
        request then delivers that certificate; without one the device had none while the CA had issued
        it, and a new request for the device was refused as a duplicate (rule device-unique).
        """
        retried_codes = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED} if after_timeout else {grpc.StatusCode.UNAVAILABLE}
        delay = 0.1
        for attempt in range(self._retries + 1):
            try:
                return call()
            except grpc.RpcError as exc:
                if exc.code() not in retried_codes or attempt == self._retries:
                    raise
                with self._retried_lock:
                    self.retried += 1
                if retries is not None:
                    retries.append(attempt)
                time.sleep(delay)
                delay = min(delay * 2, self._max_backoff)
        raise AssertionError("unreachable")

    # -- programming service ------------------------------------------------

    def sign(self, csr: bytes | str, *, request_id: str = "", profile: str = "") -> Issued:
        """Sign a CSR (PEM or DER); retries UNAVAILABLE and timeouts with the same request_id, so at most one certificate results."""
        request_id = request_id or str(uuid.uuid4())
        data = csr.encode() if isinstance(csr, str) else csr
        request = ca_pb2.SignRequest(csr=data, profile=profile, request_id=request_id)
        stub = self._stubs[next(self._turn) % len(self._stubs)]
        response: ca_pb2.SignResponse = self._call(lambda: stub.Sign(request, timeout=self._timeout))
        check_answer(data, response)
        return Issued(response.certificate_pem, response.chain_pem, response.serial, response.device_id, request_id)

    def revoke(self, serial: str, *, reason: str | int = "unspecified", invalidity_date: datetime | None = None) -> datetime:
        """Revoke one certificate; returns when it was revoked (durable in the daemon's store)."""
        request = ca_pb2.RevokeRequest(serial=serial, reason=reason_value(reason), invalidity_date=_ts(invalidity_date))  # type: ignore[arg-type]
        retries: list[int] = []
        try:
            response: ca_pb2.RevokeResponse = self._call(lambda: self._stub.Revoke(request, timeout=self._timeout), retries=retries)
        except grpc.RpcError as exc:
            # A retry (after UNAVAILABLE or a timeout) whose first attempt did commit finds the certificate revoked: ours.
            if not retries or exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
                raise
            existing = self.certificate(serial)
            if not existing.HasField("revocation") or existing.revocation.reason != request.reason:
                raise
            return existing.revocation.revoked_at.ToDatetime(tzinfo=UTC)
        return response.revoked_at.ToDatetime(tzinfo=UTC)

    def revoke_device(
        self, device_id: str, *, reason: str | int = "unspecified", serials: Sequence[str] = (), invalidity_date: datetime | None = None
    ) -> list[str]:
        """Revoke every unrevoked certificate of a device (and any listed serials) in one transaction. Officer role."""
        request = ca_pb2.RevokeBulkRequest(
            serials=list(serials),
            device_id=device_id,
            reason=reason_value(reason),  # type: ignore[arg-type]
            invalidity_date=_ts(invalidity_date),
        )
        # Not retried after a timeout: a first attempt committed late would leave the retry nothing to revoke, reported as [].
        response: ca_pb2.RevokeBulkResponse = self._call(lambda: self._stub.RevokeBulk(request, timeout=self._timeout), after_timeout=False)
        return list(response.revoked_serials)

    def unrevoke(self, serial: str) -> None:
        """Lift a certificate-hold. Officer role."""
        # Not retried after a timeout: a retry of a hold lifted late is refused as "not on hold".
        self._call(lambda: self._stub.Unrevoke(ca_pb2.UnrevokeRequest(serial=serial), timeout=self._timeout), after_timeout=False)

    # -- relying parties and operators ----------------------------------------

    def ca_certificates(self) -> list[ca_pb2.CACertificate]:
        """Every CA certificate relying parties should trust or chain through, newest first."""
        response: ca_pb2.GetCACertificatesResponse = self._call(
            lambda: self._stub.GetCACertificates(ca_pb2.GetCACertificatesRequest(), timeout=self._timeout)
        )
        return list(response.certificates)

    def chain_pem(self) -> str:
        """The active CA certificate followed by its parents up to the root (PEM): what a trust store needs."""
        for cert in self.ca_certificates():
            if cert.status == "active":
                return cert.chain_pem
        raise LookupError("the daemon reports no active CA certificate")

    def certificate(self, serial: str) -> ca_pb2.GetCertificateResponse:
        response: ca_pb2.GetCertificateResponse = self._call(
            lambda: self._stub.GetCertificate(ca_pb2.GetCertificateRequest(serial=serial), timeout=self._timeout)
        )
        return response

    def crl(self, *, delta: bool = False, issuer_key_id: str = "", if_newer_than: int = 0) -> Crl:
        """The last published full (or delta) CRL; with if_newer_than, only its number if it is not newer."""
        request = ca_pb2.GetCRLRequest(
            kind=ca_pb2.CRL_KIND_DELTA if delta else ca_pb2.CRL_KIND_FULL, issuer_key_id=issuer_key_id, if_newer_than=if_newer_than
        )
        response: ca_pb2.GetCRLResponse = self._call(lambda: self._stub.GetCRL(request, timeout=self._timeout))
        return Crl(
            der=response.crl_der,
            number=response.crl_number,
            not_modified=response.not_modified,
            this_update=response.this_update.ToDatetime(tzinfo=UTC),
            next_update=response.next_update.ToDatetime(tzinfo=UTC),
            delta=delta,
        )

    def profiles(self) -> list[ca_pb2.Profile]:
        request = ca_pb2.ListProfilesRequest()
        response: ca_pb2.ListProfilesResponse = self._call(lambda: self._stub.ListProfiles(request, timeout=self._timeout))
        return list(response.profiles)

    # -- security officers ----------------------------------------------------

    def verification_certificate(self, code: str, *, validity_seconds: int = 0) -> VerificationCertificate:
        """Have the CA key sign a certificate with subject CN = code (cloud CA registration). Officer role."""
        request = ca_pb2.IssueVerificationCertificateRequest(code=code, validity_seconds=validity_seconds)
        response: ca_pb2.IssueVerificationCertificateResponse = self._call(
            lambda: self._stub.IssueVerificationCertificate(request, timeout=self._timeout)
        )
        return VerificationCertificate(response.certificate_pem, response.certificate_der, response.serial, response.issuer_key_id)

    # -- auditors ---------------------------------------------------------------

    def audit_checkpoints(self) -> list[ca_pb2.AuditCheckpoint]:
        """Every signed checkpoint of the audit chain, oldest first (ListAuditCheckpoints, paged). Auditor role.

        All of them held: iter_audit_checkpoints reads them a page at a time.
        """
        return list(self.iter_audit_checkpoints())

    def iter_audit_checkpoints(self, *, up_to: int | None = None) -> Iterator[ca_pb2.AuditCheckpoint]:
        """The signed checkpoints of seqs up to up_to (None: all), oldest first, fetched a page at a time as they are read."""
        after, page_size = 0, 1000
        while True:
            page = self._checkpoints_after(after, page_size)
            for checkpoint in page:
                if up_to is not None and checkpoint.seq > up_to:
                    return
                yield checkpoint
            if len(page) < page_size:
                return
            after = page[-1].seq

    def last_audit_checkpoint_seq(self) -> int:
        """The highest seq a stored checkpoint covers (0: none), in about 2 log2(seq) calls of one checkpoint each.

        ListAuditCheckpoints answers only "the first after a seq": the last is found by doubling
        the step past each one found, then halving the gap, never reading the others.
        """

        def first_from(seq: int) -> int | None:  # the lowest checkpoint seq >= seq
            page = self._checkpoints_after(min(seq, _MAX_SEQ + 1) - 1, 1)
            return max(c.seq for c in page) if page else None

        low = first_from(1)
        if low is None:
            return 0
        step = 1
        while (found := first_from(low + step)) is not None:  # none at seq >= low + step: the last is below
            low, step = found, step * 2
        high = low + step
        while high - low > 1:  # low is a checkpoint seq; none is at high or above
            middle = (low + high) // 2
            found = first_from(middle)
            low, high = (found, high) if found is not None else (low, middle)
        return low

    def _checkpoints_after(self, after_seq: int, page_size: int) -> Sequence[ca_pb2.AuditCheckpoint]:
        request = ca_pb2.ListAuditCheckpointsRequest(after_seq=after_seq, page_size=page_size)
        response: ca_pb2.ListAuditCheckpointsResponse = self._call(
            functools.partial(self._stub.ListAuditCheckpoints, request, timeout=self._timeout)
        )
        return response.checkpoints

    def audit_events(self) -> Iterator[ca_pb2.AuditEvent]:
        """Every audit event, oldest first (StreamAuditEvents, unfiltered, in bounded calls resumed by page token)."""
        token = ""
        while True:
            request = ca_pb2.StreamAuditEventsRequest(page_size=5000, max_events=_AUDIT_EVENTS_PER_CALL, page_token=token)
            pages = self._call(functools.partial(self._event_pages, request))
            received = 0
            for page in pages:
                yield from page.events
                received += len(page.events)
                token = page.next_page_token or token
            if received < _AUDIT_EVENTS_PER_CALL:
                return

    def _event_pages(self, request: ca_pb2.StreamAuditEventsRequest) -> list[ca_pb2.AuditEventsPage]:
        return list(self._stub.StreamAuditEvents(request, timeout=self._timeout))

    def audit_export(self, out: TextIO) -> tuple[int, int]:
        """Write the audit log and its checkpoints as `ca-daemon audit export` does; (events, checkpoints).

        Only the checkpoints stored before the events are read, up to the last one's seq found
        first, so every one of them covers events that the stream that follows returns: a
        checkpoint past the end of the file is real truncation. Both are read a page at a time as
        they are written (a year of checkpoints every 300 s is about 100,000), none held.
        """
        up_to = self.last_audit_checkpoint_seq()
        checkpoints = (
            checkpoint_record(
                seq=c.seq,
                count=c.count,
                head_hash=c.head_hash,
                time=c.time.ToDatetime(tzinfo=UTC),
                key_id=c.key_id,
                signature=c.signature,
            )
            for c in self.iter_audit_checkpoints(up_to=up_to)
        )
        return write_export(out, interleave((event_record(_event_row(e)) for e in self.audit_events()), checkpoints))


class UnexpectedAnswer(ValueError):
    """The daemon's answer to Sign is not a certificate for the CSR sent: nothing of it may be installed on the device."""


def check_answer(csr: bytes, response: ca_pb2.SignResponse) -> None:
    """Check a Sign answer before anyone installs it: the certificate certifies the CSR's key, under the serial
    given, and was signed by the first certificate of the chain.

    A device given a certificate for another key (another device's, by a daemon's mistake or a relay's
    malice) or one that does not chain to what it was given as its chain has no working identity, and
    nothing on the line would notice until it fails to connect in the field.
    """
    try:
        request = x509.load_pem_x509_csr(csr) if csr.lstrip().startswith(b"-----BEGIN") else x509.load_der_x509_csr(csr)
        leaf = x509.load_pem_x509_certificate(response.certificate_pem.encode())
        chain = x509.load_pem_x509_certificates(response.chain_pem.encode()) if response.chain_pem.strip() else []
    except ValueError as exc:
        raise UnexpectedAnswer(f"the daemon's answer to Sign does not parse: {exc}") from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if leaf.public_key().public_bytes(*spki) != request.public_key().public_bytes(*spki):
        raise UnexpectedAnswer(
            f"the daemon answered with a certificate for another key (serial {leaf.serial_number:x}, subject "
            f"{leaf.subject.rfc4514_string()}): not the key of the CSR sent; nothing was installed"
        )
    if response.serial and f"{leaf.serial_number:x}" != response.serial.lower().lstrip("0"):
        raise UnexpectedAnswer(f"the daemon named serial {response.serial} for a certificate whose serial is {leaf.serial_number:x}")
    if not chain:
        raise UnexpectedAnswer("the daemon answered without the chain of the certificate")
    try:
        leaf.verify_directly_issued_by(chain[0])
    except (ValueError, TypeError, InvalidSignature):
        raise UnexpectedAnswer(
            f"the certificate (issuer {leaf.issuer.rfc4514_string()}) was not signed by the first certificate of the chain the "
            f"daemon sent ({chain[0].subject.rfc4514_string()}); nothing was installed"
        ) from None


def _event_row(event: ca_pb2.AuditEvent) -> dict[str, Any]:
    """An event from the API in the shape of its stored row (empty fields are the store's NULLs)."""
    return {
        "seq": event.seq,
        "time": event.time.ToDatetime(tzinfo=UTC),
        "actor": event.actor,
        "action": event.action,
        "outcome": event.outcome,
        "serial": event.serial or None,
        "device_id": event.device_id,
        "key_id": event.key_id,
        "request_digest": event.request_digest,
        "reason": event.reason,
        "details": event.details_json,
        "prev_hash": event.prev_hash or None,
        "hash": event.hash or None,
    }


def _ts(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


__all__ = [
    "REASONS",
    "CaClient",
    "Crl",
    "Issued",
    "TlsOptions",
    "UnexpectedAnswer",
    "VerificationCertificate",
    "check_answer",
    "reason_value",
]
