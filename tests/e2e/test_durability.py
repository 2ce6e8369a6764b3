"""kill -9 during a stream of Sign calls: every certificate a client received survives."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ca_daemon import config as config_module
from ca_daemon._proto.ca_daemon.v1 import ca_pb2, ca_pb2_grpc
from ca_daemon.store import SqlStore
from tests.conftest import Daemon, device_csr, make_env, openssl_verify


def test_every_received_certificate_is_stored_after_kill_9(tmp_path: Path, softhsm_conf: Path) -> None:
    env = make_env(tmp_path, softhsm_conf, workers=2)
    daemon = Daemon(env, tmp_path / "daemon.log").start()
    received: list[ca_pb2.SignResponse] = []
    errors: list[grpc.StatusCode] = []
    stop = threading.Event()
    csrs = [device_csr() for _ in range(400)]

    def client(worker: int) -> None:
        with grpc.insecure_channel(env.target) as channel:
            stub = ca_pb2_grpc.CertificateAuthorityStub(channel)
            for index in range(worker, len(csrs), 8):
                if stop.is_set():
                    return
                try:
                    received.append(stub.Sign(ca_pb2.SignRequest(csr=csrs[index], request_id=str(uuid.uuid4())), timeout=5))
                except grpc.RpcError as exc:
                    errors.append(exc.code())

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while len(received) < 60 and time.monotonic() < deadline:
        time.sleep(0.005)
    daemon.kill()
    stop.set()
    for t in threads:
        t.join()
    assert len(received) >= 60
    assert errors, "the kill should have interrupted calls in flight"

    daemon.start()
    store = SqlStore(config_module.load(env.config_path).store.url)
    try:
        for response in received:
            stored = store.get_certificate(int(response.serial, 16))
            assert stored is not None, f"certificate {response.serial} was returned but is not in the store"
            assert x509.load_der_x509_certificate(stored.der) == x509.load_pem_x509_certificate(response.certificate_pem.encode())
        for response in received[:: max(1, len(received) // 10)]:
            assert openssl_verify(tmp_path, response.certificate_pem, response.chain_pem).returncode == 0
        # The restarted daemon serves again with the same CA.
        with grpc.insecure_channel(env.target) as channel:
            after = ca_pb2_grpc.CertificateAuthorityStub(channel).Sign(
                ca_pb2.SignRequest(csr=device_csr(), request_id=str(uuid.uuid4())), timeout=10
            )
        assert after.chain_pem == received[0].chain_pem
    finally:
        store.close()
        daemon.stop()
    assert env.user_pin not in daemon.log()


@pytest.mark.parametrize("workers", [1])
def test_token_gone_while_serving_is_unavailable_then_recovers(tmp_path: Path, softhsm_conf: Path, workers: int) -> None:
    env = make_env(tmp_path, softhsm_conf, workers=workers)
    daemon = Daemon(env, tmp_path / "daemon.log").start()
    token_dir = _token_dir(softhsm_conf, env.token)
    # Outside directories.tokendir: SoftHSM finds a token renamed inside it again when it reinitialises.
    away = tmp_path / "token-away"
    try:
        with grpc.insecure_channel(env.target) as channel:
            stub = ca_pb2_grpc.CertificateAuthorityStub(channel)
            stub.Sign(ca_pb2.SignRequest(csr=device_csr(), request_id=str(uuid.uuid4())), timeout=10)
            token_dir.rename(away)
            try:
                with pytest.raises(grpc.RpcError) as excinfo:
                    stub.Sign(ca_pb2.SignRequest(csr=device_csr(), request_id=str(uuid.uuid4())), timeout=10)
                assert excinfo.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "HSM" in (excinfo.value.details() or "")
                _wait_health(env.target, health_pb2.HealthCheckResponse.NOT_SERVING, "health never showed the outage")
            finally:
                away.rename(token_dir)
            # Back to SERVING with no Sign arriving: a load balancer that honours health sends none until then.
            # (It used to reconnect only inside a call that needed the token, so it stayed NOT_SERVING.)
            _wait_health(env.target, health_pb2.HealthCheckResponse.SERVING, "health did not return after the token came back")
            response = stub.Sign(ca_pb2.SignRequest(csr=device_csr(), request_id=str(uuid.uuid4())), timeout=10)
            assert openssl_verify(tmp_path, response.certificate_pem, response.chain_pem).returncode == 0
            assert daemon.process is not None and daemon.process.poll() is None
    finally:
        daemon.stop()


def _wait_health(target: str, status: int, message: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with grpc.insecure_channel(target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        if reply.status == status:
            return
        assert time.monotonic() < deadline, f"{message}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
        time.sleep(0.2)


def _token_dir(softhsm_conf: Path, label: str) -> Path:
    for directory in (softhsm_conf.parent / "tokens").iterdir():
        token_object = directory / "token.object"
        if token_object.exists() and label.encode().ljust(32, b" ") in token_object.read_bytes():
            return directory
    raise AssertionError(f"no token directory for {label}")
