"""grpc.aio servicers: protobuf <-> domain, nothing else.

`ErrorInterceptor` is the one place that turns domain errors into gRPC status codes,
with a google.rpc.ErrorInfo detail naming the rule, field and expectation.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from google.protobuf import any_pb2
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from ca_daemon import errors
from ca_daemon._proto.ca_daemon.v1 import ca_pb2, ca_pb2_grpc
from ca_daemon.authority import Authority, chain_pem
from ca_daemon.model import CertificateRequest, Revocation
from ca_daemon.revocation import Revocations
from ca_daemon.store import serial_hex

log = logging.getLogger("ca_daemon.rpc")

SERVICE_NAME = ca_pb2.DESCRIPTOR.services_by_name["CertificateAuthority"].full_name

_STATUS: list[tuple[type[errors.CaError], grpc.StatusCode]] = [
    (errors.InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.HsmUnavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.StoreUnavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.LintFailure, grpc.StatusCode.INTERNAL),
    (errors.ConfigError, grpc.StatusCode.FAILED_PRECONDITION),
]


def status_code_for(error: errors.CaError) -> grpc.StatusCode:
    for cls, code in _STATUS:
        if isinstance(error, cls):
            return code
    return grpc.StatusCode.INTERNAL


def to_status(error: errors.CaError) -> grpc.Status:
    code = status_code_for(error)
    info = error_details_pb2.ErrorInfo(
        reason=error.rule or type(error).__name__,
        domain="ca-daemon",
        metadata={k: v for k, v in (("field", error.field), ("expected", error.expected)) if v},
    )
    detail = any_pb2.Any()
    detail.Pack(info)
    message = f"{error.message} [rule {error.rule}]" if error.rule else error.message
    return rpc_status.to_status(status_pb2.Status(code=code.value[0], message=message, details=[detail]))


Handler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps domain errors to status codes and logs one line per request."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner: Handler = handler.unary_unary
        method = handler_call_details.method

        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()
            try:
                return await inner(request, context)
            except errors.CaError as exc:
                status = to_status(exc)
                log.info("rpc %s -> %s: %s (%.1f ms)", method, status.code.name, exc.message, _ms(started))
                await context.abort_with_status(status)
            except grpc.aio.AbortError:
                raise
            except Exception:
                log.exception("rpc %s failed unexpectedly", method)
                await context.abort(grpc.StatusCode.INTERNAL, "internal error in ca-daemon; the request was not completed")

        return grpc.unary_unary_rpc_method_handler(
            guarded, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000


def _timestamp(value: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def _pem(der: bytes) -> str:
    return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM).decode()


class CertificateAuthorityServicer(ca_pb2_grpc.CertificateAuthorityServicer):
    """The CertificateAuthority service over an Authority."""

    def __init__(
        self,
        authority: Authority,
        caller_identity: Callable[[grpc.aio.ServicerContext], str],
        revocations: Revocations | None = None,
    ) -> None:
        self._authority = authority
        self._caller = caller_identity
        self._revocations = revocations

    async def Sign(self, request: ca_pb2.SignRequest, context: grpc.aio.ServicerContext) -> ca_pb2.SignResponse:
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
        self, request: ca_pb2.GetCACertificatesRequest, context: grpc.aio.ServicerContext
    ) -> ca_pb2.GetCACertificatesResponse:
        keys = await self._authority.ca_certificates()
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
                )
            )
        return response

    async def GetCertificate(
        self, request: ca_pb2.GetCertificateRequest, context: grpc.aio.ServicerContext
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

    async def Revoke(self, request: ca_pb2.RevokeRequest, context: grpc.aio.ServicerContext) -> ca_pb2.RevokeResponse:
        revocation = await self._revoker().revoke(
            request.serial, request.reason, _optional_time(request, "invalidity_date"), self._caller(context)
        )
        return ca_pb2.RevokeResponse(revoked_at=_timestamp(revocation.revoked_at))

    async def Unrevoke(self, request: ca_pb2.UnrevokeRequest, context: grpc.aio.ServicerContext) -> ca_pb2.UnrevokeResponse:
        await self._revoker().unrevoke(request.serial, self._caller(context))
        return ca_pb2.UnrevokeResponse()

    async def RevokeBulk(self, request: ca_pb2.RevokeBulkRequest, context: grpc.aio.ServicerContext) -> ca_pb2.RevokeBulkResponse:
        revoked = await self._revoker().revoke_bulk(
            list(request.serials), request.device_id, request.reason, _optional_time(request, "invalidity_date"), self._caller(context)
        )
        return ca_pb2.RevokeBulkResponse(revoked_serials=[serial_hex(r.serial) for r in revoked])

    async def GetCRL(self, request: ca_pb2.GetCRLRequest, context: grpc.aio.ServicerContext) -> ca_pb2.GetCRLResponse:
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

    async def ListProfiles(self, request: ca_pb2.ListProfilesRequest, context: grpc.aio.ServicerContext) -> ca_pb2.ListProfilesResponse:
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


def _optional_time(message: Any, field: str) -> datetime | None:
    if not message.HasField(field):
        return None
    value: datetime = getattr(message, field).ToDatetime(tzinfo=UTC)
    return value


def _revocation(revocation: Revocation) -> ca_pb2.Revocation:
    return ca_pb2.Revocation(
        reason=int(revocation.reason),  # type: ignore[arg-type]
        revoked_at=_timestamp(revocation.revoked_at),
        invalidity_date=_timestamp(revocation.invalidity_date) if revocation.invalidity_date else None,
    )


__all__ = ["CertificateAuthorityServicer", "ErrorInterceptor", "SERVICE_NAME"]
