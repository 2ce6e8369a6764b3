"""Fuzzing Sign over gRPC: 10,000+ random and mutated CSRs against a real two-worker daemon.

The inputs come from a seeded generator (reproducible): random bytes, byte-level
mutations of valid DER and PEM, and structure-aware CSRs with valid signatures (so they
get past proof of possession into the rules) whose names, string types and extensions
are random. The daemon must answer every one with a deliberate status, never UNKNOWN or
INTERNAL, and must still be serving afterwards.
"""

from __future__ import annotations

import base64
import random
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from ca_daemon._proto.ca_daemon.v1 import ca_pb2, ca_pb2_grpc
from tests import csr_forge as f
from tests.conftest import Daemon, device_csr, wait_serving
from tests.integration.policy_env import make_policy_env

TOTAL = 10_500
IN_FLIGHT = 96
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.PERMISSION_DENIED}
PROFILES = ["", "device", "fleet", "open-cn", "renewable", "restricted", "nope"]
ATTRIBUTE_OIDS = [f.CN, f.O, f.OU, "2.5.4.6", "2.5.4.5", "0.9.2342.19200300.100.1.25", "1.2.840.113549.1.9.1", "1.2.3.4.5"]
TAGS = [f.UTF8, f.PRINTABLE, f.TELETEX, f.IA5, f.BMP, 0x1C, 0x04, 0x02]
EXTENSION_OIDS = ["2.5.29.17", "2.5.29.19", "2.5.29.15", "2.5.29.37", "2.5.29.14", "1.3.6.1.4.1.99999.7"]


def _random_value(rng: random.Random) -> bytes:
    choice = rng.random()
    if choice < 0.3:
        return rng.choice([b"dev-1", b"fleet-0001", b"Example Corp", b"*.example.com", b"DE"])
    if choice < 0.6:
        return "".join(chr(rng.choice([rng.randrange(0x20, 0x7F), rng.randrange(0, 0x3000)])) for _ in range(rng.randrange(0, 80))).encode(
            "utf-8", "surrogatepass"
        )
    return rng.randbytes(rng.randrange(0, 90))


def _random_general_names(rng: random.Random) -> bytes:
    names = []
    for _ in range(rng.randrange(0, 4)):
        tag = rng.choice([0x81, 0x82, 0x86, 0x87, 0xA0, 0xA4, 0x88])
        value = rng.choice([b"fleet-0001.devices.example.com", b"urn:dev:ops:fleet-0001", b"*.x", b"\x7f\x00\x00\x01", rng.randbytes(6)])
        names.append(f.tlv(tag, value))
    return f.seq(*names)


def _structured(rng: random.Random, keys: list[ec.EllipticCurvePrivateKey]) -> bytes:
    rdns = []
    for _ in range(rng.randrange(0, 4)):
        rdn = [
            f.attribute(rng.choice(ATTRIBUTE_OIDS), _random_value(rng), rng.choice(TAGS)) for _ in range(1 if rng.random() < 0.85 else 2)
        ]
        rdns.append(rdn)
    if rng.random() < 0.5:
        rdns.insert(0, [f.attribute(f.CN, f"fuzz-{rng.randrange(10**9)}", f.UTF8)])
    extensions = []
    for _ in range(rng.randrange(0, 3)):
        ext_oid = rng.choice(EXTENSION_OIDS)
        value = _random_general_names(rng) if ext_oid == "2.5.29.17" and rng.random() < 0.7 else rng.randbytes(rng.randrange(0, 12))
        extensions.append(f.extension(ext_oid, value, critical=rng.random() < 0.3))
    return f.forge_csr(rng.choice(keys), f.name(*rdns), extensions=extensions, hash_name=rng.choice(["sha256", "sha256", "sha384", "sha1"]))


def _mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randrange(1, 6)):
        op = rng.randrange(5)
        if not buf:
            break
        i = rng.randrange(len(buf))
        if op == 0:
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1:
            buf[i] = rng.choice([0x00, 0x30, 0x80, 0xFF, 0x7F, 0x81, 0x82])
        elif op == 2:
            del buf[i : i + rng.randrange(1, 20)]
        elif op == 3:
            buf[i:i] = rng.randbytes(rng.randrange(1, 12))
        else:
            j = rng.randrange(len(buf))
            buf[i:i] = buf[j : j + rng.randrange(1, 40)]
    return bytes(buf)


def generate(count: int, seed: int = 4) -> Iterator[bytes]:
    rng = random.Random(seed)
    keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(8)]
    seeds = [device_csr(pem=False) for _ in range(8)] + [_structured(rng, keys) for _ in range(8)]
    for _ in range(count):
        kind = rng.random()
        if kind < 0.1:
            data = rng.randbytes(rng.randrange(0, 600))
        elif kind < 0.45:
            data = _mutate(rng, rng.choice(seeds))
        else:
            data = _structured(rng, keys)
            if rng.random() < 0.2:
                data = _mutate(rng, data)
        if rng.random() < 0.15:
            data = b"-----BEGIN CERTIFICATE REQUEST-----\n" + base64.encodebytes(data) + b"-----END CERTIFICATE REQUEST-----\n"
        yield data


@pytest.fixture(scope="module")
def fuzz_daemon(tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path) -> Iterator[Daemon]:
    env = make_policy_env(tmp_path_factory.mktemp("fuzz"), softhsm_conf, workers=2)
    daemon = Daemon(env, tmp_path_factory.mktemp("fuzz-log") / "daemon.log").start()
    yield daemon
    daemon.stop()


@pytest.mark.timeout(300)
def test_ten_thousand_hostile_csrs_never_crash_the_daemon_nor_end_in_internal(fuzz_daemon: Daemon) -> None:
    rng = random.Random(7)
    outcomes: dict[grpc.StatusCode, int] = {}
    unexpected: list[tuple[grpc.StatusCode, str]] = []
    with grpc.insecure_channel(fuzz_daemon.env.target) as channel:
        stub = ca_pb2_grpc.CertificateAuthorityStub(channel)
        pending: list[grpc.Future[ca_pb2.SignResponse]] = []

        def drain(limit: int) -> None:
            while len(pending) > limit:
                future = pending.pop(0)
                error = future.exception()
                if error is not None and not isinstance(error, grpc.RpcError):
                    raise error
                code = grpc.StatusCode.OK if error is None else error.code()
                outcomes[code] = outcomes.get(code, 0) + 1
                if code not in ALLOWED:
                    unexpected.append((code, "" if error is None else error.details() or ""))

        for data in generate(TOTAL):
            request = ca_pb2.SignRequest(csr=data, profile=rng.choice(PROFILES), request_id=str(uuid.uuid4()))
            pending.append(stub.Sign.future(request, timeout=60))
            drain(IN_FLIGHT)
        drain(0)
    assert sum(outcomes.values()) == TOTAL
    assert not unexpected, unexpected[:5]
    assert fuzz_daemon.process is not None and fuzz_daemon.process.poll() is None
    wait_serving(fuzz_daemon.env.target, 10)
    log = fuzz_daemon.log()
    assert "failed unexpectedly" not in log and "Traceback" not in log
    # Most inputs are refused; the rules were reached, not only the parser.
    assert outcomes.get(grpc.StatusCode.INVALID_ARGUMENT, 0) > TOTAL // 2
