"""Shared by the revocation and CRL tests: a daemon with HTTP on a free port and a fast CRL schedule."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
from cryptography import x509

from ca_daemon._proto.ca_daemon.v1 import ca_pb2, ca_pb2_grpc
from tests.conftest import CaEnv, Daemon, device_csr, free_port, make_env


def crl_env(base: Path, softhsm_conf: Path, *, workers: int = 1, init: bool = True) -> tuple[CaEnv, int]:
    """A CA whose HTTP server, CDP and AIA URLs use a free port, checking for new revocations every 100 ms."""
    env = make_env(base, softhsm_conf, workers=workers, init=init)
    http_port = free_port()
    env.edit_config("127.0.0.1:8080", f"127.0.0.1:{http_port}")
    env.edit_config("publish_on_revoke = true\n", "publish_on_revoke = true\ncheck_interval_ms = 100\n")
    if "allow_reissue = false" in env.config_path.read_text():
        env.edit_config("allow_reissue = false", "allow_reissue = true")  # several certificates per device
    return env, http_port


def start(env: CaEnv, log_dir: Path) -> Daemon:
    return Daemon(env, log_dir / f"daemon-{uuid.uuid4().hex[:8]}.log").start()


def stub(channel: grpc.Channel) -> ca_pb2_grpc.CertificateAuthorityStub:
    return ca_pb2_grpc.CertificateAuthorityStub(channel)


def sign(channel: grpc.Channel, device_id: str | None = None, timeout: float = 10.0) -> ca_pb2.SignResponse:
    response: ca_pb2.SignResponse = stub(channel).Sign(
        ca_pb2.SignRequest(csr=device_csr(device_id), request_id=str(uuid.uuid4())), timeout=timeout
    )
    return response


def get_crl(channel: grpc.Channel, *, delta: bool = False, if_newer_than: int = 0, timeout: float = 10.0) -> ca_pb2.GetCRLResponse:
    kind = ca_pb2.CRL_KIND_DELTA if delta else ca_pb2.CRL_KIND_FULL
    request = ca_pb2.GetCRLRequest(kind=kind, if_newer_than=if_newer_than)
    response: ca_pb2.GetCRLResponse = stub(channel).GetCRL(request, timeout=timeout)
    return response


def wait_for_crl(
    channel: grpc.Channel, predicate: Callable[[x509.CertificateRevocationList], bool], *, delta: bool = True, timeout: float = 15.0
) -> ca_pb2.GetCRLResponse:
    """Poll GetCRL until the published CRL of that kind satisfies predicate."""
    deadline = time.monotonic() + timeout
    while True:
        response = get_crl(channel, delta=delta, timeout=max(10.0, timeout))
        if predicate(x509.load_der_x509_crl(response.crl_der)):
            return response
        if time.monotonic() > deadline:
            raise AssertionError(f"no {'delta' if delta else 'full'} CRL satisfying the condition within {timeout}s")
        time.sleep(0.1)


def serials_in(crl: x509.CertificateRevocationList) -> dict[int, x509.RevokedCertificate]:
    return {entry.serial_number: entry for entry in crl}


def running(env: CaEnv, log_dir: Path) -> Iterator[Daemon]:
    daemon = start(env, log_dir)
    try:
        yield daemon
    finally:
        daemon.stop()
