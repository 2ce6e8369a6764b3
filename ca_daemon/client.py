"""A small client for programming services: sign a CSR, fetch CA certificates and certificates.

    from ca_daemon.client import CaClient
    with CaClient("127.0.0.1:50051") as ca:
        issued = ca.sign(csr_pem, request_id="line3-000123")
        open("device.pem", "w").write(issued.certificate_pem + issued.chain_pem)

Retries on UNAVAILABLE are safe because Sign is idempotent by request_id.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import grpc

from ca_daemon._proto.ca_daemon.v1 import ca_pb2, ca_pb2_grpc


@dataclass(frozen=True)
class Issued:
    certificate_pem: str
    chain_pem: str
    serial: str
    device_id: str
    request_id: str


class CaClient:
    """A blocking client over one gRPC channel (plaintext in development mode)."""

    def __init__(self, target: str, *, timeout: float = 10.0, retries: int = 5) -> None:
        self._channel = grpc.insecure_channel(target)
        self._stub = ca_pb2_grpc.CertificateAuthorityStub(self._channel)
        self._timeout = timeout
        self._retries = retries

    def __enter__(self) -> CaClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def sign(self, csr: bytes | str, *, request_id: str = "", profile: str = "") -> Issued:
        """Sign a CSR; retries UNAVAILABLE with the same request_id, so at most one certificate results."""
        request_id = request_id or str(uuid.uuid4())
        data = csr.encode() if isinstance(csr, str) else csr
        request = ca_pb2.SignRequest(csr=data, profile=profile, request_id=request_id)
        delay = 0.1
        for attempt in range(self._retries + 1):
            try:
                response = self._stub.Sign(request, timeout=self._timeout)
                return Issued(response.certificate_pem, response.chain_pem, response.serial, response.device_id, request_id)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or attempt == self._retries:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
        raise AssertionError("unreachable")

    def ca_certificates(self) -> list[ca_pb2.CACertificate]:
        return list(self._stub.GetCACertificates(ca_pb2.GetCACertificatesRequest(), timeout=self._timeout).certificates)

    def certificate(self, serial: str) -> ca_pb2.GetCertificateResponse:
        response: ca_pb2.GetCertificateResponse = self._stub.GetCertificate(
            ca_pb2.GetCertificateRequest(serial=serial), timeout=self._timeout
        )
        return response
