"""grpc.aio servicers: protobuf <-> domain, nothing else.

`ErrorInterceptor` is the one request pipeline: it authenticates the caller and checks
the method's role rule (access.py), turns domain errors into gRPC status codes with a
google.rpc.ErrorInfo detail naming the rule, field and expectation, writes one JSON log
line per request (method, caller, status, latency) and counts it in the metrics.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import contextvars
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import grpc
from cryptography import x509
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from ca_daemon import errors
from ca_daemon._proto.ca_daemon.v1 import ca_pb2, ca_pb2_grpc
from ca_daemon.access import NO_CLIENT_CERTIFICATE, Authenticator, Principal, authorize, denial_event
from ca_daemon.audit import AuditQuery, AuditReader
from ca_daemon.authority import Authority, chain_pem
from ca_daemon.issuer import CA_SUBJECT_EXPECTED, parse_subject
from ca_daemon.logs import LogThrottle
from ca_daemon.metrics import RequestMetrics
from ca_daemon.model import AuditEvent, CertificateRequest, KeySpec, Revocation
from ca_daemon.registration import VerificationCertificates
from ca_daemon.revocation import Revocations
from ca_daemon.rotation import KeyCeremony, root_validity
from ca_daemon.store import serial_hex

log = logging.getLogger("ca_daemon.rpc")
T = TypeVar("T")

SERVICE_NAME = ca_pb2.DESCRIPTOR.services_by_name["CertificateAuthority"].full_name

_STATUS: list[tuple[type[errors.CaError], grpc.StatusCode]] = [
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.QuotaExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.HsmUnavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.StoreUnavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.CaKeyChanged, grpc.StatusCode.UNAVAILABLE),
    (errors.Overloaded, grpc.StatusCode.UNAVAILABLE),
    (errors.LintFailure, grpc.StatusCode.INTERNAL),
    (errors.ConfigError, grpc.StatusCode.FAILED_PRECONDITION),
]


def status_code_for(error: errors.CaError) -> grpc.StatusCode:
    for cls, code in _STATUS:
        if isinstance(error, cls):
            return code
    return grpc.StatusCode.INTERNAL


def status_message(error: errors.CaError) -> str:
    """The message a caller gets: the rule kept, the rest cut to errors.MESSAGE_BYTES.

    It is the error's caller_message: what names the host's layout (a file's path) stays in the
    request's log line, which carries the whole message (see errors.CaError).
    """
    if not error.rule:
        return errors.capped(error.caller_message)
    rule = f" [rule {errors.capped(error.rule, 128)}]"
    return errors.capped(error.caller_message, errors.MESSAGE_BYTES - len(rule.encode())) + rule


def to_status(error: errors.CaError) -> grpc.Status:
    code = status_code_for(error)
    metadata = {k: errors.capped(v, errors.MESSAGE_BYTES // 2) for k, v in (("field", error.field), ("expected", error.expected)) if v}
    info = error_details_pb2.ErrorInfo(reason=errors.capped(error.rule or type(error).__name__, 128), domain="ca-daemon", metadata=metadata)
    detail = any_pb2.Any()
    detail.Pack(info)
    return rpc_status.to_status(status_pb2.Status(code=code.value[0], message=status_message(error), details=[detail]))


Handler = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]
StreamHandler = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Any]]
DenialRecorder = Callable[[AuditEvent], Awaitable[None]]

# The authenticated caller of the request being served (set by ErrorInterceptor).
_PRINCIPAL: contextvars.ContextVar[Principal] = contextvars.ContextVar("ca_daemon_principal")


def caller_of(_context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The identity ErrorInterceptor authenticated for the current request."""
    return _PRINCIPAL.get().identity


def roles_of(_context: grpc.aio.ServicerContext[Any, Any]) -> frozenset[str]:
    """The roles of the caller ErrorInterceptor authenticated for the current request."""
    return _PRINCIPAL.get().roles


class RequestLog:
    """The per-request log line and metrics, written in batches on the event loop.

    Written one by one, between gRPC's own work for the next request, each line cost about
    50 us of CPU (measured here on a grpc.aio echo server under load) against 18 us written
    in batches, whose logging code stays in the CPU caches. So a request's line is written at
    most FLUSH_S after it ended, stamped with the time it ended; flush() writes what is
    pending at once (the worker calls it when it stops).
    """

    FLUSH_S = 0.02

    def __init__(self, metrics: RequestMetrics | None = None) -> None:
        self._metrics = metrics
        self._pending: list[tuple[float, str, str, str, float, str, bool]] = []
        self._timer: asyncio.TimerHandle | None = None

    def add(self, method: str, caller: str, code: str, seconds: float, message: str = "", *, log_line: bool = True) -> None:
        """log_line False: counted in the metrics only (a refusal the interceptor logs in summary)."""
        self._pending.append((time.time(), method, caller, code, seconds, message, log_line))
        if self._timer is None:
            try:
                self._timer = asyncio.get_running_loop().call_later(self.FLUSH_S, self.flush)
            except RuntimeError:  # no loop (a servicer test calling the interceptor directly)
                self.flush()

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, []
        for ended, method, caller, code, seconds, message, log_line in pending:
            if log_line and log.isEnabledFor(logging.INFO):
                fields: dict[str, object] = {"method": method, "caller": caller, "status": code, "latency_ms": round(seconds * 1000, 2)}
                if message:
                    fields["error"] = message
                record = log.makeRecord(log.name, logging.INFO, __file__, 0, "rpc %s %s", (method, code), None, extra={"fields": fields})
                record.created, record.msecs = ended, (ended - int(ended)) * 1000
                log.handle(record)
            if self._metrics is not None:
                self._metrics.request(method, code, seconds)


class ErrorInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Authenticates and authorises, maps domain errors to status codes, logs and counts one line per request.

    Without an authenticator (tests of the servicer alone) every caller is let through
    and the servicer's own caller function names them.

    It also caps the calls a worker handles at once (max_calls_in_flight, 0 for no cap): one
    more is refused at once as UNAVAILABLE, before authentication, with a message that says
    to back off. Without the cap a burst queued without bound (20,000 Sign calls in flight
    held 430 MB in one worker), and past about a thousand calls not yet taken up, gRPC itself
    cancelled some: the caller saw CANCELLED with no reason, and the daemon logged nothing.
    Health and reflection are not counted, so a busy worker still answers its health check.
    """

    def __init__(
        self,
        authenticator: Authenticator | None = None,
        record_denial: DenialRecorder | None = None,
        metrics: RequestMetrics | None = None,
        auth_context_of: Callable[[grpc.aio.ServicerContext[Any, Any]], Mapping[str, Iterable[bytes]]] | None = None,
        max_calls_in_flight: int = 0,
    ) -> None:
        self._authenticator = authenticator
        self._max_calls_in_flight = max_calls_in_flight
        self._calls_in_flight = 0  # only the event loop's thread changes it
        # Behind the TLS front end (tls_front.py) the handshake's results are looked up by peer address.
        self._auth_context_of = auth_context_of or (lambda context: context.auth_context())
        self._record_denial = record_denial
        self.request_log = RequestLog(metrics)
        self._uncertified_lines = LogThrottle(_UNCERTIFIED_LOG_INTERVAL_S)

    @property
    def calls_in_flight(self) -> int:
        """The calls this worker is handling now (0 unless max_calls_in_flight is set: only then are they counted)."""
        return self._calls_in_flight

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        deserializer = _decoding(handler.request_deserializer)
        serializer = handler.response_serializer
        # Every kind of handler is guarded: reflection's ServerReflectionInfo is a bidirectional stream,
        # and it was served to callers with no certificate, or a revoked one, when only unary handlers were.
        if handler.unary_unary is not None:
            unary: Handler = handler.unary_unary  # type: ignore[assignment]
            guarded = self._guard(method, lambda request, context: unary(_decoded(request), context))
            return grpc.unary_unary_rpc_method_handler(guarded, request_deserializer=deserializer, response_serializer=serializer)
        if handler.stream_unary is not None:
            gathering: Handler = handler.stream_unary  # type: ignore[assignment]
            guarded = self._guard(method, lambda requests, context: gathering(_decoded_each(requests), context))
            return grpc.stream_unary_rpc_method_handler(guarded, request_deserializer=deserializer, response_serializer=serializer)
        if handler.unary_stream is not None:
            stream: StreamHandler = handler.unary_stream  # type: ignore[assignment]
            streamed = self._guard_stream(method, lambda request, context: stream(_decoded(request), context))
            return grpc.unary_stream_rpc_method_handler(streamed, request_deserializer=deserializer, response_serializer=serializer)
        bidirectional: StreamHandler = handler.stream_stream  # type: ignore[assignment]
        streamed = self._guard_stream(method, lambda requests, context: bidirectional(_decoded_each(requests), context))
        return grpc.stream_stream_rpc_method_handler(streamed, request_deserializer=deserializer, response_serializer=serializer)

    def _guard(self, method: str, call: Handler) -> Handler:
        """A handler with one answer, run inside _outcome."""

        async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            async with self._outcome(method, context):
                return await call(request, context)

        return guarded

    def _guard_stream(self, method: str, call: StreamHandler) -> StreamHandler:
        """A handler with a stream of answers, run inside _outcome."""

        async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            async with self._outcome(method, context):
                answers = call(request, context)
                if inspect.isawaitable(answers):  # a handler that answers with context.write (health's Watch)
                    await answers
                else:
                    async for item in answers:
                        yield item

        return guarded

    @contextlib.asynccontextmanager
    async def _outcome(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[None]:
        """Admit the caller, then log and count the call's outcome and map a domain error to its status."""
        started = time.perf_counter()
        caller = "-"
        counted = self._max_calls_in_flight > 0 and not method.startswith(_UNCAPPED_METHODS)
        if counted and self._calls_in_flight >= self._max_calls_in_flight:
            await self._refuse(method, caller, _overloaded(self._calls_in_flight), context, started)
        self._calls_in_flight += counted
        try:
            caller = await self._admit(method, context)
            yield
        except errors.CaError as exc:
            await self._refuse(method, caller, exc, context, started)
        except grpc.aio.AbortError:  # a library's handler ended the call with a status (health's Check: NOT_FOUND)
            self._done(method, caller, _aborted_code(context), started)
            raise
        except asyncio.CancelledError:
            # gRPC cancels the handler when the caller's deadline passes or it goes away (or the worker stops).
            # Not an Exception: uncaught here, a Sign whose caller timed out was neither logged nor counted.
            self._done(method, caller, _cancelled_code(context), started)
            raise
        except Exception:
            log.exception("rpc %s failed unexpectedly", method)
            self._done(method, caller, "INTERNAL", started)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error in ca-daemon; the request was not completed")
        else:
            self._done(method, caller, "OK", started)
        finally:
            self._calls_in_flight -= counted

    async def _admit(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> str:
        """Steps 3-5 of client authentication (the handshake did 1-2); the caller's identity."""
        if self._authenticator is None:
            return "-"
        try:
            principal = self._authenticator.authenticate(self._auth_context_of(context))
        except errors.Unauthenticated as exc:
            if exc.rule == NO_CLIENT_CERTIFICATE:
                self._refused_uncertified(method)
            else:
                await self._deny("-", method, exc)
            raise
        _PRINCIPAL.set(principal)
        try:
            authorize(principal, method)
        except errors.PermissionDenied as exc:
            await self._deny(principal.identity, method, exc)
            raise
        return principal.identity

    def _refused_uncertified(self, method: str) -> None:
        """A call with no client certificate: one log line per interval with how many, no audit event (access.NO_CLIENT_CERTIFICATE).

        Each was an access.deny event and a request-log line: 34,500 calls in 10 s from a peer with no
        certificate added 14 MB to the database. They are still counted in the request metrics (UNAUTHENTICATED).
        """
        held_back = self._uncertified_lines.admit("no-client-certificate")
        if held_back is not None:
            log.warning(
                "refused %d call(s) without a client certificate (not audited: anyone who reaches the port can make them)%s; "
                "the last to %s",
                held_back + 1,
                f" in the last {_UNCERTIFIED_LOG_INTERVAL_S:.0f} s" if held_back else "",
                method,
            )

    async def _deny(self, actor: str, method: str, exc: errors.Unauthenticated | errors.PermissionDenied) -> None:
        if self._record_denial is None:
            return
        await self._record_denial(denial_event(actor, method, exc))

    async def _refuse(
        self, method: str, caller: str, exc: errors.CaError, context: grpc.aio.ServicerContext[Any, Any], started: float
    ) -> None:
        status = to_status(exc)
        self._done(method, caller, status.code.name, started, errors.capped(exc.message), log_line=exc.rule != NO_CLIENT_CERTIFICATE)
        await context.abort_with_status(status)  # type: ignore[attr-defined]

    def _done(self, method: str, caller: str, code: str, started: float, message: str = "", *, log_line: bool = True) -> None:
        seconds = time.perf_counter() - started
        if caller == "-":  # refused after authentication, before _admit returned
            principal = _PRINCIPAL.get(None)
            caller = principal.identity if principal is not None else caller
        self.request_log.add(method, caller, code, seconds, message, log_line=log_line)


# grpc.health.v1 and grpc.reflection: cheap, and a load balancer must still get a busy worker's health.
_UNCAPPED_METHODS = "/grpc."
# A cancelled call with less than this left of its deadline is counted as DEADLINE_EXCEEDED (see _cancelled_code).
_DEADLINE_MARGIN_S = 0.25
# Calls without a client certificate are logged in one line per this many seconds, with their number.
_UNCERTIFIED_LOG_INTERVAL_S = 10.0


def _aborted_code(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The status a handler aborted the call with, as the caller sees it (UNKNOWN if gRPC does not say)."""
    code = context.code()
    return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"


def _cancelled_code(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """DEADLINE_EXCEEDED for a call cancelled at (or just before) its deadline, else CANCELLED (the caller went away).

    The caller's own timer fires first and its cancellation arrives a moment before the deadline here
    (which counts from the call's arrival): hence the margin.
    """
    left = context.time_remaining()
    return "DEADLINE_EXCEEDED" if left is not None and left < _DEADLINE_MARGIN_S else "CANCELLED"


def _overloaded(calls: int) -> errors.Overloaded:
    return errors.Overloaded(
        f"this ca-daemon worker already has {calls} calls in flight, as many as it takes (server.max_calls_in_flight); "
        "nothing was done: retry after a back-off, or spread the calls over more workers or replicas",
        rule="max-calls-in-flight",
    )


@dataclass(frozen=True)
class _Undecodable:
    """A request whose bytes are not its message: refused by the handler, like any other invalid request."""

    message_type: str
    error: str


def _decoding(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """The method's request deserializer, returning _Undecodable instead of raising.

    An exception in a deserializer ends the call in gRPC's own code: UNKNOWN and an ERROR traceback in the
    log, with no request line or metric. Returned instead, the error reaches the handler after
    authentication and is refused there as INVALID_ARGUMENT, logged and counted like other refusals.
    """
    if deserializer is None:
        return None
    descriptor = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    message_type = descriptor.full_name if descriptor is not None else "request message"

    def decode(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError as exc:
            return _Undecodable(message_type, str(exc))

    return decode


async def _decoded_each(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        yield _decoded(request)


def _decoded(request: Any) -> Any:
    if isinstance(request, _Undecodable):
        raise errors.InvalidRequest(
            f"request is not a valid {request.message_type}: {request.error}",
            rule="request-encoding",
            expected=f"a {request.message_type} in the protobuf wire format, its strings UTF-8",
        )
    return request


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000


def _timestamp(value: datetime) -> Timestamp:
    """An aware datetime as a Timestamp, in two C calls: protobuf's FromDatetime, Python code on every Sign, cost more."""
    return Timestamp(seconds=int(value.replace(microsecond=0).timestamp()), nanos=value.microsecond * 1000)


def _pem(der: bytes) -> str:
    """PEM of a DER certificate we stored ourselves (no re-parse: this runs on every Sign)."""
    body = base64.b64encode(der).decode("ascii")
    lines = "\n".join(body[i : i + 64] for i in range(0, len(body), 64))
    return f"-----BEGIN CERTIFICATE-----\n{lines}\n-----END CERTIFICATE-----\n"


class CertificateAuthorityServicer(ca_pb2_grpc.CertificateAuthorityServicer):
    """The CertificateAuthority service over an Authority."""

    def __init__(
        self,
        authority: Authority,
        caller_identity: Callable[[grpc.aio.ServicerContext[Any, Any]], str],
        caller_roles: Callable[[grpc.aio.ServicerContext[Any, Any]], frozenset[str]],
        revocations: Revocations | None = None,
        verification: VerificationCertificates | None = None,
        audit: AuditReader | None = None,
    ) -> None:
        self._authority = authority
        self._caller = caller_identity
        self._roles = caller_roles
        self._revocations = revocations
        self._verification = verification
        self._audit = audit

    async def Sign(self, request: ca_pb2.SignRequest, context: grpc.aio.ServicerContext[Any, Any]) -> ca_pb2.SignResponse:
        result = await self._authority.sign(
            CertificateRequest(csr=request.csr, profile=request.profile, request_id=request.request_id, caller=self._caller(context))
        )
        cert = result.certificate
        return ca_pb2.SignResponse(
            certificate_pem=_pem(cert.der),
            chain_pem=result.chain_pem,
            serial=serial_hex(cert.serial),
            not_before=_timestamp(cert.not_before),
            not_after=_timestamp(cert.not_after),
            device_id=cert.device_id,
            profile=cert.profile,
            issuer_key_id=cert.issuer_key_id,
        )

    async def GetCACertificates(
        self, request: ca_pb2.GetCACertificatesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ca_pb2.GetCACertificatesResponse:
        keys = await self._authority.ca_certificates()
        links = await self._authority.link_certificates()
        response = ca_pb2.GetCACertificatesResponse()
        for key in keys:
            assert key.certificate_der is not None
            cert = x509.load_der_x509_certificate(key.certificate_der)
            response.certificates.append(
                ca_pb2.CACertificate(
                    key_id=key.key_id,
                    certificate_pem=_pem(key.certificate_der),
                    chain_pem=chain_pem(key.certificate_der, key.chain_der),
                    status=key.status.value,
                    not_before=_timestamp(cert.not_valid_before_utc),
                    not_after=_timestamp(cert.not_valid_after_utc),
                    link_certificates_pem=[_pem(der) for der in links.get(key.key_id, [])],
                    halted_at=_timestamp(key.halted_at) if key.halted_at is not None else None,
                )
            )
        return response

    async def GetCertificate(
        self, request: ca_pb2.GetCertificateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ca_pb2.GetCertificateResponse:
        cert = await self._authority.get_certificate(request.serial)
        revocation = await self._revoker().revocation_of(cert.serial) if self._revocations is not None else None
        return ca_pb2.GetCertificateResponse(
            certificate_pem=_pem(cert.der),
            serial=serial_hex(cert.serial),
            device_id=cert.device_id,
            profile=cert.profile,
            issuer_key_id=cert.issuer_key_id,
            not_before=_timestamp(cert.not_before),
            not_after=_timestamp(cert.not_after),
            revocation=_revocation(revocation) if revocation is not None else None,
        )

    # -- revocation and CRLs (issue 5) ----------------------------------------

    def _revoker(self) -> Revocations:
        if self._revocations is None:
            raise errors.FailedPrecondition("revocation is not enabled in this server")
        return self._revocations

    async def Revoke(self, request: ca_pb2.RevokeRequest, context: grpc.aio.ServicerContext[Any, Any]) -> ca_pb2.RevokeResponse:
        revocation = await self._revoker().revoke(
            request.serial, request.reason, _time_or_refusal(request, "invalidity_date"), self._caller(context), roles=self._roles(context)
        )
        return ca_pb2.RevokeResponse(revoked_at=_timestamp(revocation.revoked_at))

    async def Unrevoke(self, request: ca_pb2.UnrevokeRequest, context: grpc.aio.ServicerContext[Any, Any]) -> ca_pb2.UnrevokeResponse:
        await self._revoker().unrevoke(request.serial, self._caller(context))
        return ca_pb2.UnrevokeResponse()

    async def RevokeBulk(self, request: ca_pb2.RevokeBulkRequest, context: grpc.aio.ServicerContext[Any, Any]) -> ca_pb2.RevokeBulkResponse:
        revoked = await self._revoker().revoke_bulk(
            list(request.serials), request.device_id, request.reason, _time_or_refusal(request, "invalidity_date"), self._caller(context)
        )
        return ca_pb2.RevokeBulkResponse(revoked_serials=[serial_hex(r.serial) for r in revoked])

    async def GetCRL(self, request: ca_pb2.GetCRLRequest, context: grpc.aio.ServicerContext[Any, Any]) -> ca_pb2.GetCRLResponse:
        if request.kind not in (ca_pb2.CRL_KIND_FULL, ca_pb2.CRL_KIND_DELTA):
            raise errors.InvalidRequest(
                f"CRL kind {request.kind} is unknown", rule="kind", field="kind", expected="CRL_KIND_FULL or CRL_KIND_DELTA"
            )
        answer = await self._revoker().get_crl(
            delta=request.kind == ca_pb2.CRL_KIND_DELTA, issuer_key_id=request.issuer_key_id, if_newer_than=request.if_newer_than
        )
        crl = answer.crl
        return ca_pb2.GetCRLResponse(
            crl_der=b"" if answer.not_modified else crl.der,
            crl_number=crl.crl_number,
            not_modified=answer.not_modified,
            this_update=_timestamp(crl.this_update),
            next_update=_timestamp(crl.next_update),
        )

    async def IssueVerificationCertificate(
        self, request: ca_pb2.IssueVerificationCertificateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ca_pb2.IssueVerificationCertificateResponse:
        if self._verification is None:
            raise errors.FailedPrecondition("verification certificates are not enabled in this server")
        result = await self._verification.request(request.code, request.validity_seconds, self._caller(context))
        return ca_pb2.IssueVerificationCertificateResponse(
            certificate_pem=result.pem,
            certificate_der=result.der,
            serial=result.serial,
            issuer_key_id=result.issuer_key_id,
            not_after=_timestamp(result.certificate.not_valid_after_utc),
        )

    async def StreamAuditEvents(
        self, request: ca_pb2.StreamAuditEventsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[ca_pb2.AuditEventsPage]:
        if self._audit is None:
            raise errors.FailedPrecondition("the audit log is not served by this server")
        query = AuditQuery(
            after_seq=request.after_seq,
            from_time=_optional_time(request, "from_time"),
            actions=tuple(request.actions),
            device_id=request.device_id,
            serial=request.serial,
            page_size=request.page_size,
            max_events=request.max_events,
            page_token=request.page_token,
        )
        async for rows, token in self._audit.pages(query):
            yield ca_pb2.AuditEventsPage(events=[_audit_event(r) for r in rows], next_page_token=token)

    async def ListAuditCheckpoints(
        self, request: ca_pb2.ListAuditCheckpointsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ca_pb2.ListAuditCheckpointsResponse:
        if self._audit is None:
            raise errors.FailedPrecondition("the audit log is not served by this server")
        checkpoints = await self._audit.checkpoints(request.after_seq, request.page_size)
        return ca_pb2.ListAuditCheckpointsResponse(
            checkpoints=[
                ca_pb2.AuditCheckpoint(
                    seq=c.seq, count=c.count, head_hash=c.head_hash, time=_timestamp(c.time), key_id=c.key_id, signature=c.signature
                )
                for c in checkpoints
            ]
        )

    async def ListProfiles(
        self, request: ca_pb2.ListProfilesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ca_pb2.ListProfilesResponse:
        profiles = self._authority.policy.profiles
        return ca_pb2.ListProfilesResponse(
            profiles=[
                ca_pb2.Profile(
                    name=p.name,
                    description=p.description,
                    rules=p.describe_rules(),
                    default_validity_seconds=int(p.validity.total_seconds()),
                    max_validity_seconds=int(p.max_validity.total_seconds()),
                )
                for p in sorted(profiles.values(), key=lambda p: p.name)
            ]
        )


class KeyCeremonyServicer(ca_pb2_grpc.KeyCeremonyServicer):
    """The KeyCeremony service over rotation.KeyCeremony (blocking: run in a thread)."""

    def __init__(
        self,
        ceremony: KeyCeremony,
        caller_identity: Callable[[grpc.aio.ServicerContext[Any, Any]], str],
        on_activation: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        self._ceremony = ceremony
        self._caller = caller_identity
        self._on_activation = on_activation

    async def GenerateKey(
        self, request: ca_pb2.GenerateKeyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ca_pb2.GenerateKeyResponse:
        spec = await self._converted(context, "key.generate", request.label, lambda: _key_spec(request.key_type or KeySpec.EC_P256.value))
        key = await asyncio.to_thread(self._ceremony.generate, self._caller(context), spec, request.label)
        return ca_pb2.GenerateKeyResponse(key_id=key.key_id, pkcs11_uri=key.pkcs11_uri)

    async def SelfSignKey(
        self, request: ca_pb2.SelfSignKeyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ca_pb2.SelfSignKeyResponse:
        subject = await self._converted(context, "key.certificate", request.key_id, lambda: _subject(request.subject))
        validity = await self._converted(context, "key.certificate", request.key_id, lambda: root_validity(request.validity_days))
        result = await asyncio.to_thread(self._ceremony.self_sign, self._caller(context), request.key_id, subject, validity)
        return ca_pb2.SelfSignKeyResponse(
            certificate_pem=_pem(result.key.certificate_der or b""), link_certificates_pem=[_pem(link.der) for link in result.links]
        )

    async def GetKeyCSR(self, request: ca_pb2.GetKeyCSRRequest, context: grpc.aio.ServicerContext[Any, Any]) -> ca_pb2.GetKeyCSRResponse:
        subject = await self._converted(context, "key.csr", request.key_id, lambda: _subject(request.subject))
        csr = await asyncio.to_thread(self._ceremony.csr, self._caller(context), request.key_id, subject)
        return ca_pb2.GetKeyCSRResponse(csr_pem=csr.decode())

    async def InstallKeyCertificate(
        self, request: ca_pb2.InstallKeyCertificateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ca_pb2.InstallKeyCertificateResponse:
        certificates = await self._converted(context, "key.certificate", request.key_id, lambda: _certificates(request.certificate_pem))
        await asyncio.to_thread(self._ceremony.install, self._caller(context), request.key_id, certificates[0], certificates[1:])
        return ca_pb2.InstallKeyCertificateResponse()

    async def ListKeys(self, request: ca_pb2.ListKeysRequest, context: grpc.aio.ServicerContext[Any, Any]) -> ca_pb2.ListKeysResponse:
        infos = await asyncio.to_thread(self._ceremony.list_keys)
        response = ca_pb2.ListKeysResponse()
        for info in infos:
            item = ca_pb2.CAKeyInfo(
                key_id=info.key.key_id,
                pkcs11_uri=info.key.pkcs11_uri,
                key_type=info.key.spec.value,
                status=info.key.status.value,
                has_certificate=info.key.certificate_der is not None,
                emergency_successor_key_id=info.emergency_successor or "",
            )
            times = {**info.lifecycle.times, "activatable_at": info.activatable_at, "halted_at": info.key.halted_at}
            for name, value in times.items():
                if value is not None:
                    getattr(item, name).CopyFrom(_timestamp(value))
            response.keys.append(item)
        return response

    async def _converted(self, context: grpc.aio.ServicerContext[Any, Any], action: str, key_id: str, convert: Callable[[], T]) -> T:
        """convert(): a part of the request as the use case takes it; its refusal is audited like the use case's own."""
        try:
            return convert()
        except errors.InvalidRequest as refusal:
            await asyncio.to_thread(self._ceremony.refused, action, self._caller(context), key_id, refusal)
            raise

    async def ApproveKeyAction(
        self, request: ca_pb2.ApproveKeyActionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ca_pb2.ApproveKeyActionResponse:
        result = await asyncio.to_thread(
            self._ceremony.approve, self._caller(context), request.action, request.key_id, request.successor_key_id
        )
        if result.executed and self._on_activation is not None:
            await self._on_activation()  # this worker switches at once; the others at their next poll
        return ca_pb2.ApproveKeyActionResponse(executed=result.executed, officers=list(result.officers), message=result.message)


def _key_spec(value: str) -> KeySpec:
    try:
        return KeySpec(value)
    except ValueError:
        raise errors.InvalidRequest(
            f"key type {errors.echo(value)} is unknown", rule="key-type", field="key_type", expected=", ".join(s.value for s in KeySpec)
        ) from None


def _certificates(pem: str) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(pem.encode())
    except ValueError:
        raise errors.InvalidRequest(
            "certificate_pem is not PEM certificates", rule="certificate", field="certificate_pem", expected="PEM"
        ) from None


def _subject(text: str) -> x509.Name:
    try:
        return parse_subject(text)
    except ValueError as exc:
        raise errors.InvalidRequest(str(exc), rule="subject", field="subject", expected=CA_SUBJECT_EXPECTED) from None


def _time_or_refusal(message: Any, field: str) -> datetime | errors.InvalidRequest | None:
    """The optional time, or the refusal of one that does not convert: the domain call refuses (and audits) it with the rest."""
    try:
        return _optional_time(message, field)
    except errors.InvalidRequest as refusal:
        return refusal


def _optional_time(message: Any, field: str) -> datetime | None:
    if not message.HasField(field):
        return None
    stamp: Timestamp = getattr(message, field)
    try:
        value: datetime = stamp.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise errors.InvalidRequest(
            f"{field} is not a valid timestamp (seconds {stamp.seconds}, nanos {stamp.nanos})",
            rule="timestamp",
            field=field,
            expected="a google.protobuf.Timestamp from 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999999Z, nanos 0-999999999",
        ) from None
    return value


def _audit_event(row: dict[str, Any]) -> ca_pb2.AuditEvent:
    time_value: datetime = row["time"] if row["time"].tzinfo else row["time"].replace(tzinfo=UTC)
    return ca_pb2.AuditEvent(
        seq=int(row["seq"]),
        time=_timestamp(time_value),
        actor=row["actor"],
        action=row["action"],
        outcome=row["outcome"],
        serial=row["serial"] or "",
        device_id=row["device_id"] or "",
        key_id=row["key_id"] or "",
        request_digest=bytes(row["request_digest"] or b""),
        reason=row["reason"] or "",
        details_json=row["details"] or "{}",
        prev_hash=bytes(row["prev_hash"] or b""),
        hash=bytes(row["hash"] or b""),
    )


def _revocation(revocation: Revocation) -> ca_pb2.Revocation:
    return ca_pb2.Revocation(
        reason=int(revocation.reason),  # type: ignore[arg-type]
        revoked_at=_timestamp(revocation.revoked_at),
        invalidity_date=_timestamp(revocation.invalidity_date) if revocation.invalidity_date else None,
    )


__all__ = ["CertificateAuthorityServicer", "ErrorInterceptor", "RequestLog", "KeyCeremonyServicer", "SERVICE_NAME", "caller_of", "roles_of"]
