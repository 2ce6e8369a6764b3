"""A hostile-CSR corpus sent through Sign over gRPC to a real daemon (SoftHSM, SQLite).

Each case asserts the exact status code and the rule that refused it, in the status
message and in the google.rpc.ErrorInfo detail. After the corpus, the store holds no
certificate from it and every refusal is in the audit log.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from ca_daemon._proto.ca_daemon.v1 import ca_pb2, ca_pb2_grpc
from ca_daemon.store import open_store
from tests import csr_forge as f
from tests.conftest import Daemon
from tests.integration.policy_env import make_policy_env

EXISTING_DEVICE = "corpus-existing-1"
FLEET_DEVICE = "fleet-0001"
_EXISTING_KEY = ec.generate_private_key(ec.SECP256R1())
_KEY = ec.generate_private_key(ec.SECP256R1())
_RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)

OK, INVALID, DENIED, EXISTS = (
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.ALREADY_EXISTS,
)


def csr(
    cn: str | None = "corpus-dev-1",
    *,
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey | None = None,
    extra: list[x509.NameAttribute[str | bytes]] | None = None,
    sans: list[x509.GeneralName] | None = None,
    extensions: list[tuple[x509.ExtensionType, bool]] | None = None,
    hash_algorithm: hashes.HashAlgorithm | None = None,
    pem: bool = True,
) -> bytes:
    """A well-formed CSR made with cryptography (the forge covers what it refuses to make)."""
    key = key or _KEY
    attributes = ([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn is not None else []) + (extra or [])
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attributes))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    for value, critical in extensions or []:
        builder = builder.add_extension(value, critical=critical)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hash_algorithm or hashes.SHA256()
    request = builder.sign(key, algorithm)  # type: ignore[arg-type]
    return request.public_bytes(serialization.Encoding.PEM if pem else serialization.Encoding.DER)


def fleet(cn: str = FLEET_DEVICE, **kwargs: object) -> bytes:
    extra = kwargs.pop("extra", None) or [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example Corp")]
    return csr(cn, extra=extra, **kwargs)  # type: ignore[arg-type]


def forged(subject: bytes, **kwargs: object) -> bytes:
    return f.forge_csr(kwargs.pop("key", _KEY), subject, **kwargs)  # type: ignore[arg-type]


def cn_forged(value: bytes | str, tag: int = f.UTF8, **kwargs: object) -> bytes:
    return forged(f.simple_name((f.CN, value, tag)), **kwargs)


def _ku(**on: bool) -> x509.KeyUsage:
    flags = dict.fromkeys(
        (
            "digital_signature",
            "content_commitment",
            "key_encipherment",
            "data_encipherment",
            "key_agreement",
            "key_cert_sign",
            "crl_sign",
            "encipher_only",
            "decipher_only",
        ),
        False,
    )
    return x509.KeyUsage(**{**flags, **on})


def _flip_signature(data: bytes) -> bytes:
    der = bytearray(data)
    der[-4] ^= 0x01
    return bytes(der)


def _two_blocks() -> bytes:
    one = csr()
    return one + one


@dataclass(frozen=True)
class Case:
    id: str
    make: Callable[[], bytes]
    code: grpc.StatusCode
    rule: str
    profile: str = ""


CASES = [
    # -- keys ------------------------------------------------------------------
    Case("rsa-1024", lambda: csr(key=rsa.generate_private_key(public_exponent=65537, key_size=1024)), INVALID, "key-type"),
    Case("rsa-exponent-3", lambda: csr(key=rsa.generate_private_key(public_exponent=3, key_size=2048)), INVALID, "key-type"),
    Case("ec-p521", lambda: csr(key=ec.generate_private_key(ec.SECP521R1())), INVALID, "key-type"),
    Case("ec-secp256k1", lambda: csr(key=ec.generate_private_key(ec.SECP256K1())), INVALID, "key-type"),
    Case("ec-p384-where-only-p256", lambda: fleet(key=ec.generate_private_key(ec.SECP384R1())), INVALID, "key-type", "fleet"),
    Case("ed25519-where-refused", lambda: fleet(key=ed25519.Ed25519PrivateKey.generate()), INVALID, "key-type", "fleet"),
    # -- CSR signature -----------------------------------------------------------
    Case("sha1-ecdsa", lambda: cn_forged("corpus-dev-1", hash_name="sha1"), INVALID, "csr-signature-algorithm"),
    Case("sha1-rsa", lambda: cn_forged("corpus-dev-1", key=_RSA, hash_name="sha1"), INVALID, "csr-signature-algorithm"),
    Case("md5-rsa", lambda: cn_forged("corpus-dev-1", key=_RSA, hash_name="md5"), INVALID, "csr-signature-algorithm"),
    Case("sha384-where-only-sha256", lambda: fleet(hash_algorithm=hashes.SHA384()), INVALID, "csr-signature-algorithm", "fleet"),
    Case("broken-pop", lambda: _flip_signature(csr(pem=False)), INVALID, "proof-of-possession"),
    Case(
        "pop-by-another-key",
        lambda: cn_forged("corpus-dev-1", spki_of=ec.generate_private_key(ec.SECP256R1())),
        INVALID,
        "proof-of-possession",
    ),
    # -- subject -----------------------------------------------------------------
    Case("cn-missing", lambda: csr(None, extra=[x509.NameAttribute(NameOID.ORGANIZATION_NAME, "x")]), INVALID, "subject-required"),
    Case("empty-subject", lambda: forged(f.name()), INVALID, "subject-required"),
    Case("o-missing", lambda: fleet(extra=[x509.NameAttribute(NameOID.COUNTRY_NAME, "DE")]), INVALID, "subject-required", "fleet"),
    Case(
        "two-cns",
        lambda: csr("corpus-dev-1", extra=[x509.NameAttribute(NameOID.COMMON_NAME, "corpus-dev-2")]),
        INVALID,
        "subject-cn",
    ),
    Case("cn-nul", lambda: cn_forged("corpus\x00dev"), INVALID, "subject-characters"),
    Case("cn-newline", lambda: csr("corpus-dev\n1"), INVALID, "subject-characters"),
    Case("cn-rtl-override", lambda: csr("corpus-\u202eved"), INVALID, "subject-characters"),
    Case("cn-zero-width", lambda: csr("corpus\u200b-dev"), INVALID, "subject-characters"),
    Case("cn-nul-any-cn-profile", lambda: cn_forged("corpus\x00dev"), INVALID, "subject-characters", "open-cn"),
    Case("cn-over-long", lambda: cn_forged("d" * 65), INVALID, "device-id-format"),
    Case("cn-over-long-any-cn-profile", lambda: cn_forged("d" * 65), INVALID, "subject-length", "open-cn"),
    Case("cn-empty-any-cn-profile", lambda: cn_forged(""), INVALID, "subject-length", "open-cn"),
    Case("cn-homoglyph", lambda: csr("corpus-d\u0435v-1"), INVALID, "device-id-format"),  # Cyrillic ie
    Case("cn-fullwidth", lambda: csr("corpus-\uff44ev-1"), INVALID, "device-id-format"),
    Case("cn-bmpstring", lambda: cn_forged("corpus-dev-1", f.BMP), INVALID, "subject-string-type"),
    Case("cn-teletexstring", lambda: cn_forged(b"corpus-dev-1", f.TELETEX), INVALID, "subject-string-type"),
    Case("cn-invalid-utf8", lambda: cn_forged(b"corpus-\xff\xfe-dev"), INVALID, "subject-string-type"),
    Case("cn-bad-printablestring", lambda: cn_forged(b"corpus@dev", f.PRINTABLE), INVALID, "subject-string-type"),
    Case(
        "multi-valued-rdn",
        lambda: forged(f.name([f.attribute(f.CN, "corpus-dev-1"), f.attribute(f.O, "Example Corp")])),
        INVALID,
        "subject-structure",
    ),
    Case(
        "forbidden-ou",
        lambda: fleet(
            extra=[
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example Corp"),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Admins"),
            ]
        ),
        INVALID,
        "subject-attributes",
        "fleet",
    ),
    Case(
        "wrong-o",
        lambda: fleet(extra=[x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Evil Corp")]),
        INVALID,
        "subject-attributes",
        "fleet",
    ),
    Case("o-on-cn-only-profile", lambda: csr(extra=[x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Any")]), INVALID, "subject-attributes"),
    # -- SANs --------------------------------------------------------------------
    Case("san-wildcard", lambda: fleet(sans=[x509.DNSName(f"*.{FLEET_DEVICE}.devices.example.com")]), INVALID, "san-wildcard", "fleet"),
    Case(
        "san-ip-not-allowed",
        lambda: fleet(sans=[x509.IPAddress(__import__("ipaddress").ip_address("10.0.0.1"))]),
        INVALID,
        "san-type",
        "fleet",
    ),
    Case("san-email-not-allowed", lambda: fleet(sans=[x509.RFC822Name("a@example.com")]), INVALID, "san-type", "fleet"),
    Case(
        "san-dirname",
        lambda: fleet(sans=[x509.DirectoryName(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))]),
        INVALID,
        "san-type",
        "fleet",
    ),
    Case("san-on-no-san-profile", lambda: csr(sans=[x509.DNSName("corpus-dev-1.example.com")]), INVALID, "san-type"),
    Case(
        "san-uri-other-device",
        lambda: fleet(sans=[x509.UniformResourceIdentifier("urn:dev:ops:fleet-9999")]),
        INVALID,
        "san-pattern",
        "fleet",
    ),
    Case("san-dns-other-device", lambda: fleet(sans=[x509.DNSName("fleet-9999.devices.example.com")]), INVALID, "san-pattern", "fleet"),
    Case("san-dns-other-domain", lambda: fleet(sans=[x509.DNSName(f"{FLEET_DEVICE}.evil.example")]), INVALID, "san-pattern", "fleet"),
    # -- requested extensions ----------------------------------------------------
    Case(
        "requested-ca-true",
        lambda: csr(extensions=[(x509.BasicConstraints(ca=True, path_length=None), True)]),
        INVALID,
        "requested-extensions",
    ),
    Case(
        "requested-keycertsign",
        lambda: csr(extensions=[(_ku(digital_signature=True, key_cert_sign=True), True)]),
        INVALID,
        "requested-extensions",
    ),
    Case("requested-crlsign", lambda: csr(extensions=[(_ku(crl_sign=True), True)]), INVALID, "requested-extensions"),
    Case(
        "requested-eku-where-refused",
        lambda: fleet(extensions=[(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)]),
        INVALID,
        "requested-extensions",
        "fleet",
    ),
    Case(
        "requested-unknown-critical",
        lambda: fleet(extensions=[(x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"\x05\x00"), True)]),
        INVALID,
        "requested-extensions",
        "fleet",
    ),
    # -- uniqueness --------------------------------------------------------------
    Case("duplicate-device-id", lambda: csr(EXISTING_DEVICE, key=ec.generate_private_key(ec.SECP256R1())), EXISTS, "device-unique"),
    Case("reused-public-key", lambda: csr("corpus-other-device", key=_EXISTING_KEY), EXISTS, "public-key-unique"),
    Case("reused-key-renewable-profile", lambda: csr("corpus-dev-x", key=_EXISTING_KEY), EXISTS, "public-key-unique", "renewable"),
    # -- encoding ----------------------------------------------------------------
    Case("pem-trailing-data", lambda: csr() + b"-----BEGIN GARBAGE-----\n", INVALID, "csr-format"),
    Case("der-trailing-data", lambda: csr(pem=False) + b"\x00\x00", INVALID, "csr-format"),
    Case("two-pem-blocks", _two_blocks, INVALID, "csr-format"),
    Case("oversize", lambda: b"-----BEGIN CERTIFICATE REQUEST-----\n" + base64.encodebytes(b"\x00" * 70000), INVALID, "csr-size"),
    Case("truncated-der", lambda: csr(pem=False)[:-20], INVALID, "csr-format"),
    Case("garbage", lambda: b"\x30\x82\xff\xff" + b"A" * 100, INVALID, "csr-format"),
    Case("empty", lambda: b"", INVALID, "csr-format"),
    Case(
        "duplicate-extension",
        lambda: cn_forged("corpus-dev-1", extensions=[f.extension("2.5.29.19", f.seq()), f.extension("2.5.29.19", f.seq())]),
        INVALID,
        "csr-format",
    ),
    # -- callers -----------------------------------------------------------------
    Case("profile-of-another-caller", csr, DENIED, "caller-profiles", "restricted"),
    Case("unknown-profile", csr, DENIED, "caller-profiles", "no-such-profile"),
]


@pytest.fixture(scope="module")
def corpus_daemon(tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path) -> Iterator[Daemon]:
    env = make_policy_env(tmp_path_factory.mktemp("corpus"), softhsm_conf)
    daemon = Daemon(env, tmp_path_factory.mktemp("corpus-log") / "daemon.log").start()
    with grpc.insecure_channel(env.target) as channel:
        _sign(channel, csr(EXISTING_DEVICE, key=_EXISTING_KEY), "")
    yield daemon
    daemon.stop()


def _sign(channel: grpc.Channel, data: bytes, profile: str) -> ca_pb2.SignResponse:
    stub = ca_pb2_grpc.CertificateAuthorityStub(channel)
    response: ca_pb2.SignResponse = stub.Sign(ca_pb2.SignRequest(csr=data, profile=profile, request_id=str(uuid.uuid4())), timeout=15)
    return response


def test_corpus_has_at_least_forty_cases() -> None:
    assert len(CASES) >= 40
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_csr_is_refused_by_the_named_rule(corpus_daemon: Daemon, case: Case) -> None:
    with grpc.insecure_channel(corpus_daemon.env.target) as channel, pytest.raises(grpc.RpcError) as excinfo:
        _sign(channel, case.make(), case.profile)
    error = excinfo.value
    assert error.code() == case.code, error.details()
    assert f"[rule {case.rule}]" in (error.details() or "")
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert info.reason == case.rule
    assert info.domain == "ca-daemon"


def test_after_the_corpus_the_store_holds_only_the_setup_certificate(corpus_daemon: Daemon) -> None:
    # Runs after the parametrized cases (file order); on its own it checks the same invariant.
    store = open_store(f"sqlite:///{corpus_daemon.env.state_dir / 'ca.db'}")
    try:
        assert store.count_certificates() == 1
        events = store.audit_events()
    finally:
        store.close()
    refused = [e for e in events if e["outcome"] == "refused"]
    issued = [e for e in events if e["outcome"] == "issued"]
    assert len(issued) == 1
    assert {e["reason"] for e in refused} >= {"key-type", "subject-characters", "device-unique", "caller-profiles"}


def test_the_default_profile_still_issues_a_cn_only_csr(corpus_daemon: Daemon) -> None:
    with grpc.insecure_channel(corpus_daemon.env.target) as channel:
        response = _sign(channel, csr("corpus-good-1", key=ec.generate_private_key(ec.SECP256R1())), "")
    cert = x509.load_pem_x509_certificate(response.certificate_pem.encode())
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).critical
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).critical
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_a_fleet_csr_gets_its_checked_names_and_the_template_san(corpus_daemon: Daemon) -> None:
    with grpc.insecure_channel(corpus_daemon.env.target) as channel:
        response = _sign(
            channel,
            fleet("fleet-0042", key=ec.generate_private_key(ec.SECP256R1()), sans=[x509.DNSName("fleet-0042.devices.example.com")]),
            "fleet",
        )
    cert = x509.load_pem_x509_certificate(response.certificate_pem.encode())
    assert cert.subject.rfc4514_string() == "O=Example Corp,CN=fleet-0042"  # RFC 4514 lists the last RDN first
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == ["urn:dev:ops:fleet-0042"]
    assert sans.get_values_for_type(x509.DNSName) == ["fleet-0042.devices.example.com"]
