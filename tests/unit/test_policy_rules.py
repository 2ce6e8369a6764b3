"""Each policy rule on its own, the profile builder, caller authorization, and the pre-issuance lint."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from ca_daemon import config, issuer, policy
from ca_daemon.config import ProfileConfig
from ca_daemon.errors import AlreadyExists, ConfigError, InvalidRequest, LintFailure, PermissionDenied, PolicyViolation
from ca_daemon.lint import Linter, certificate_shape
from tests import csr_forge as f

KEY = ec.generate_private_key(ec.SECP256R1())


def parsed(
    *attrs: tuple[x509.ObjectIdentifier, str],
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey = KEY,
    sans: list[x509.GeneralName] | None = None,
    extensions: list[tuple[x509.ExtensionType, bool]] | None = None,
) -> policy.ParsedRequest:
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([x509.NameAttribute(o, v) for o, v in attrs]))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    for value, critical in extensions or []:
        builder = builder.add_extension(value, critical=critical)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    der = builder.sign(key, algorithm).public_bytes(serialization.Encoding.DER)
    return policy.parse_csr(der, 65536)


def cn(value: str = "dev-1", **kwargs: object) -> policy.ParsedRequest:
    return parsed((NameOID.COMMON_NAME, value), **kwargs)  # type: ignore[arg-type]


def refused_by(rule: policy.Rule, request: policy.ParsedRequest) -> str:
    with pytest.raises(PolicyViolation) as excinfo:
        rule.check(request)
    assert excinfo.value.field and excinfo.value.expected
    return excinfo.value.rule


def test_key_types() -> None:
    rule = policy.AllowedKeyTypes(("P-256",), 2048, 4096, ed25519=False)
    rule.check(cn())
    rule.check(cn(key=rsa.generate_private_key(public_exponent=65537, key_size=2048)))
    assert refused_by(rule, cn(key=ec.generate_private_key(ec.SECP384R1()))) == "key-type"
    assert refused_by(rule, cn(key=rsa.generate_private_key(public_exponent=3, key_size=2048))) == "key-type"
    assert refused_by(rule, cn(key=rsa.generate_private_key(public_exponent=65537, key_size=1024))) == "key-type"
    assert refused_by(rule, cn(key=ed25519.Ed25519PrivateKey.generate())) == "key-type"
    assert refused_by(policy.AllowedKeyTypes(rsa_max_bits=0), cn(key=rsa.generate_private_key(65537, 2048))) == "key-type"


def test_csr_signature_algorithms_and_weak_hashes() -> None:
    policy.CsrSignatureAlgorithm(("ecdsa-with-SHA256",)).check(cn())
    assert refused_by(policy.CsrSignatureAlgorithm(("ed25519",)), cn()) == "csr-signature-algorithm"
    for hash_name in ("sha1",):
        with pytest.raises(PolicyViolation) as excinfo:
            policy.parse_csr(f.forge_csr(KEY, f.simple_name((f.CN, "dev-1", f.UTF8)), hash_name=hash_name), 65536)
        assert excinfo.value.rule == "csr-signature-algorithm"


def test_subject_rules() -> None:
    assert refused_by(policy.SubjectCharacters(), cn("dev\u202e1")) == "subject-characters"
    assert refused_by(policy.SubjectCharacters(), cn("dev\n1")) == "subject-characters"
    policy.SubjectCharacters().check(cn("gerät-1"))  # non-ASCII letters are characters, not controls
    long_cn = policy.parse_csr(f.forge_csr(KEY, f.simple_name((f.CN, "x" * 65, f.UTF8))), 65536)
    assert refused_by(policy.SubjectValueLength(64), long_cn) == "subject-length"
    assert refused_by(policy.SubjectValueLength(8), cn("x" * 9)) == "subject-length"
    assert refused_by(policy.SubjectRequired(("CN", "O")), cn()) == "subject-required"
    two = parsed((NameOID.COMMON_NAME, "a"), (NameOID.COMMON_NAME, "b"))
    assert refused_by(policy.SingleCommonName(), two) == "subject-cn"
    assert refused_by(policy.DeviceIdPattern(config.DEFAULT_DEVICE_ID_PATTERN), cn("dev 1")) == "device-id-format"
    with_o = parsed((NameOID.COMMON_NAME, "dev-1"), (NameOID.ORGANIZATION_NAME, "Example"))
    policy.SubjectAttributes((("O", "^Example$"),)).check(with_o)
    assert refused_by(policy.SubjectAttributes((("O", "^Other$"),)), with_o) == "subject-attributes"
    assert refused_by(policy.SubjectAttributes(), with_o) == "subject-attributes"
    bmp = policy.parse_csr(f.forge_csr(KEY, f.simple_name((f.CN, "dev-1", f.BMP))), 65536)
    assert refused_by(policy.SubjectStringType(), bmp) == "subject-string-type"
    multi = policy.parse_csr(f.forge_csr(KEY, f.name([f.attribute(f.CN, "a"), f.attribute(f.O, "b")])), 65536)
    assert refused_by(policy.SubjectStructure(), multi) == "subject-structure"


def test_san_rules() -> None:
    allowed = (("dns", r"^{device_id}\.example\.com$"), ("uri", "^urn:dev:ops:{device_id}$"))
    good = cn(sans=[x509.DNSName("dev-1.example.com"), x509.UniformResourceIdentifier("urn:dev:ops:dev-1")])
    for rule in (policy.SanTypes(("dns", "uri")), policy.SanNoWildcards(), policy.SanValues(allowed)):
        rule.check(good)
    assert refused_by(policy.SanTypes(("dns",)), good) == "san-type"
    assert refused_by(policy.SanNoWildcards(), cn(sans=[x509.DNSName("*.example.com")])) == "san-wildcard"
    assert refused_by(policy.SanValues(allowed), cn(sans=[x509.DNSName("dev-2.example.com")])) == "san-pattern"
    # The device ID is escaped: "dev.1" must not match "devX1".
    assert refused_by(policy.SanValues(allowed), cn("dev.1", sans=[x509.DNSName("devX1.example.com")])) == "san-pattern"


def test_requested_extensions() -> None:
    ku = x509.KeyUsage(False, False, False, False, False, True, False, False, False)
    assert refused_by(policy.RequestedExtensions(), cn(extensions=[(x509.BasicConstraints(True, None), True)])) == "requested-extensions"
    assert refused_by(policy.RequestedExtensions(), cn(extensions=[(ku, True)])) == "requested-extensions"
    eku = cn(extensions=[(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), False)])
    policy.RequestedExtensions().check(eku)  # dropped, not copied
    assert refused_by(policy.RequestedExtensions(refuse_others=True), eku) == "requested-extensions"


def test_fact_rules() -> None:
    policy.OneActivePerDevice().check_facts("dev-1", policy.NO_FACTS)
    with pytest.raises(AlreadyExists) as excinfo:
        policy.OneActivePerDevice().check_facts("dev-1", policy.IssuanceFacts(active_serials_for_device=(0x1234,)))
    assert excinfo.value.rule == "device-unique" and "1234" in excinfo.value.message
    policy.PublicKeyBoundToDevice().check_facts("dev-1", policy.IssuanceFacts(devices_with_public_key=("dev-1",)))
    with pytest.raises(AlreadyExists) as excinfo:
        policy.PublicKeyBoundToDevice().check_facts("dev-1", policy.IssuanceFacts(devices_with_public_key=("dev-2",)))
    assert excinfo.value.rule == "public-key-unique"


def test_renewal_profile_skips_the_one_active_rule_but_not_the_key_rule() -> None:
    profile = policy.build_profile(ProfileConfig(name="r", allow_reissue=True))
    facts = policy.IssuanceFacts(active_serials_for_device=(1,))
    assert policy.decide(cn(), profile, facts).device_id == "dev-1"
    with pytest.raises(AlreadyExists):
        policy.decide(cn(), profile, policy.IssuanceFacts(devices_with_public_key=("other",)))


def test_decision_carries_template_sans_and_profile_usages() -> None:
    profile = policy.build_profile(
        ProfileConfig(name="p", san_templates=("urn:dev:ops:{device_id}",), key_usage=("digitalSignature", "keyAgreement"))
    )
    decision = policy.decide(cn(), profile)
    assert decision.sans == (x509.UniformResourceIdentifier("urn:dev:ops:dev-1"),)
    assert decision.key_usage == frozenset({"digitalSignature", "keyAgreement"})
    with pytest.raises(PolicyViolation) as excinfo:
        policy.decide(cn(), profile, requested_validity=timedelta(days=5000))
    assert excinfo.value.rule == "validity"


def test_settle_after_check_rules_is_decide_and_still_applies_the_fact_rules() -> None:
    """The Sign path: check_rules before the store read, settle (no second run of the request rules) after it."""
    profile = policy.build_profile(ProfileConfig(name="p", san_templates=("urn:dev:ops:{device_id}",)))
    request = cn()
    settled = policy.settle(request, profile, policy.check_rules(request, profile))
    decided = policy.decide(request, profile)
    assert settled == decided and settled.device_id == "dev-1"
    with pytest.raises(AlreadyExists) as excinfo:
        policy.settle(request, profile, "dev-1", policy.IssuanceFacts(active_serials_for_device=(0x1234,)))
    assert excinfo.value.rule == "device-unique"


def test_callers_may_use_only_their_profiles() -> None:
    policy.authorize("a", "device", {"a": ("device",)})
    with pytest.raises(PermissionDenied) as excinfo:
        policy.authorize("a", "other", {"a": ("device",)})
    assert excinfo.value.rule == "caller-profiles"
    with pytest.raises(PermissionDenied):
        policy.authorize("stranger", "device", {"a": ("device",)})


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('csr_signature_algorithms = ["sha1WithRSAEncryption"]', "never allowed"),
        ('ec_curves = ["P-999"]', "unknown name 'P-999'"),
        ('key_usage = ["keyCertSign"]', "CAs only"),
        ("rsa_min_bits = 1024", "out of range"),
        ('subject_required = ["O"]', "subject_allowed does not allow"),
        ('requested_extensions = "copy"', "drop"),
        ("[profiles.x.subject_allowed]\nCN = '.*'", "device_id_pattern"),
        ("[profiles.x.san_allowed]\nrid = '.*'", "unknown name 'rid'"),
    ],
)
def test_invalid_profile_settings_are_refused_by_name(table: str, message: str) -> None:
    raw = f"[profiles.x]\n{table}\n"
    import tomllib

    base = {
        "server": {"dev_mode": True},
        "hsm": {"pin_env": "X", "token": "t"},
        "ca": {"key": "pkcs11:token=t;object=k"},
        "default_profile": "x",
    }
    with pytest.raises(ConfigError) as excinfo:
        config.parse({**base, **tomllib.loads(raw)}, Path("/tmp/c.toml"))
    assert message in excinfo.value.message


def _ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    root = issuer.build_root(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test CA")]), key.public_key(), datetime.now(UTC), timedelta(days=30)
    )
    return key, root.sign(key, hashes.SHA256())


def _leaf(decision: policy.Decision, root: x509.Certificate) -> x509.CertificateBuilder:
    return issuer.build_leaf(
        decision, root, issuer.new_serial(), datetime.now(UTC), timedelta(minutes=1), issuer.LeafUrls(["http://ca.example/ca.crl"])
    )


def test_lint_before_sign_signs_exactly_what_was_linted_and_caches_the_shape() -> None:
    key, root = _ca()
    linter = Linter("template")
    profile = policy.build_profile(ProfileConfig(name="device", san_templates=("urn:dev:ops:{device_id}",)))
    first = issuer.sign_linted(_leaf(policy.decide(cn("dev-1"), profile), root), key, issuer.draft_key_like(key), linter)
    second = issuer.sign_linted(_leaf(policy.decide(cn("dev-2"), profile), root), key, issuer.draft_key_like(key), linter)
    assert linter.full_lints == 1  # same shape: pkilint once, the varying fields checked directly
    assert certificate_shape(first) == certificate_shape(second)
    first.verify_directly_issued_by(root)


def test_the_shape_separates_what_pkilint_judges_and_ignores_what_varies() -> None:
    """The template cache key: one full lint per shape, so a different structure must be a different shape."""
    key, root = _ca()
    profile = policy.build_profile(
        ProfileConfig(name="device", san_templates=("urn:dev:ops:{device_id}",), subject_allowed=(("O", "Acme.*"),))
    )

    def shape(request: policy.ParsedRequest, *, extra: x509.ExtensionType | None = None, critical: bool = False, days: int = 30) -> object:
        decision = policy.decide(request, profile)
        builder = issuer.build_leaf(
            decision, root, issuer.new_serial(), datetime.now(UTC), timedelta(minutes=1), issuer.LeafUrls(["http://ca.example/ca.crl"])
        )
        if extra is not None:
            builder = builder.add_extension(extra, critical=critical)
        return certificate_shape(builder.sign(key, hashes.SHA256()))

    base = shape(cn("dev-1"))
    # What varies per certificate: device ID (subject and SAN values), key, serial, validity values.
    assert shape(cn("another-device-0042", key=ec.generate_private_key(ec.SECP256R1()))) == base
    # What pkilint judges: the key's algorithm and size, the subject's structure and string types, the extensions.
    assert shape(cn(key=ec.generate_private_key(ec.SECP384R1()))) != base
    assert shape(cn(key=rsa.generate_private_key(65537, 2048))) != shape(cn(key=rsa.generate_private_key(65537, 3072)))
    with_o = shape(parsed((NameOID.COMMON_NAME, "dev-1"), (NameOID.ORGANIZATION_NAME, "Acme")))
    assert with_o != base
    assert shape(parsed((NameOID.COMMON_NAME, "dev-2"), (NameOID.ORGANIZATION_NAME, "Acme Widgets"))) == with_o
    ocsp_no_check = x509.OCSPNoCheck()
    assert shape(cn(), extra=ocsp_no_check) != base
    assert shape(cn(), extra=ocsp_no_check, critical=True) != shape(cn(), extra=ocsp_no_check)
    dns = shape(cn(), extra=x509.IssuerAlternativeName([x509.DNSName("ca.example")]))
    assert dns != shape(cn(), extra=x509.IssuerAlternativeName([x509.DNSName("ca.example.org")]))


def test_the_template_lint_refuses_a_subject_key_identifier_not_made_by_method_1() -> None:
    key, root = _ca()
    decision = policy.decide(cn(), policy.build_profile(ProfileConfig(name="device")))
    linter = Linter("template")
    issuer.sign_linted(_leaf(decision, root), key, issuer.draft_key_like(key), linter)  # the shape, linted in full
    builder = x509.CertificateBuilder(
        issuer_name=root.subject,
        subject_name=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev-1")]),
        public_key=serialization.load_der_public_key(decision.public_key_der),  # type: ignore[arg-type]
        serial_number=issuer.new_serial(),
        not_valid_before=datetime.now(UTC) - timedelta(minutes=1),
        not_valid_after=datetime.now(UTC) + timedelta(days=30),
    )
    for extension in _leaf(decision, root).sign(key, hashes.SHA256()).extensions:
        value = x509.SubjectKeyIdentifier(b"\x01" * 20) if isinstance(extension.value, x509.SubjectKeyIdentifier) else extension.value
        builder = builder.add_extension(value, critical=extension.critical)
    with pytest.raises(LintFailure) as excinfo:
        issuer.sign_linted(builder, key, issuer.draft_key_like(key), linter)
    assert "subjectKeyIdentifier" in excinfo.value.message
    assert linter.full_lints == 1  # same shape as the good certificate: refused by the per-certificate check


def test_lint_failure_refuses_issuance() -> None:
    key, root = _ca()
    decision = policy.decide(cn(), policy.build_profile(ProfileConfig(name="device")))
    bad = _leaf(decision, root).add_extension(x509.SubjectAlternativeName([x509.DNSName("not a domain")]), critical=False)
    for mode in ("template", "full"):
        with pytest.raises(LintFailure) as excinfo:
            issuer.sign_linted(bad, key, issuer.draft_key_like(key), Linter(mode))
        assert "domain" in excinfo.value.message
    issuer.sign_linted(bad, key, key, Linter("off"))


def _der_integer(value: int) -> bytes:
    return f.tlv(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def _rsa_csr_with_a_bad_signature(modulus: int, exponent: int) -> bytes:
    """A CSR for the RSA public key (modulus, exponent) whose signature is garbage: no proof of possession."""
    rsa_key = f.seq(_der_integer(modulus), _der_integer(exponent))
    spki = f.seq(f.seq(f.oid("1.2.840.113549.1.1.1"), f.tlv(0x05, b"")), f.tlv(0x03, b"\x00" + rsa_key))
    info = f.seq(f.tlv(0x02, b"\x00"), f.simple_name((f.CN, "dev-1", f.UTF8)), spki, f.tlv(0xA0, b""))
    return f.seq(info, f.seq(f.oid(f.SIG_OIDS[("rsa", "sha256")]), f.tlv(0x05, b"")), f.tlv(0x03, b"\x00" + b"\x5a" * 256))


@pytest.mark.parametrize(
    ("bits", "exponent", "shown"),
    [(1024, 65537, "RSA-1024 with exponent 65537"), (4096, 2**3071 + 1, "RSA-4096 with exponent <a 3072-bit number>")],
    ids=["rsa-1024", "rsa-4096-with-a-3072-bit-exponent"],
)
def test_the_key_type_rule_refuses_before_proof_of_possession_is_checked(bits: int, exponent: int, shown: str) -> None:
    """A key the profile refuses costs no signature verification; the refusal quotes a huge exponent short."""
    modulus = (1 << (bits - 1)) | secrets.randbits(bits - 2) | 1  # an odd number of that size: the key is never used
    der = _rsa_csr_with_a_bad_signature(modulus, exponent)
    with pytest.raises(PolicyViolation) as excinfo:
        policy.parse_csr(der, 65536, policy.AllowedKeyTypes())
    assert excinfo.value.rule == "key-type"
    assert excinfo.value.message == f"{shown} is not allowed"
    # Without the profile's key rule the same CSR fails proof of possession: the order above is the key rule's doing.
    with pytest.raises(InvalidRequest) as without:
        policy.parse_csr(der, 65536)
    assert without.value.rule == "proof-of-possession"


def test_a_profiles_key_rule_is_the_one_parse_csr_applies_before_proof_of_possession() -> None:
    profile = policy.build_profile(ProfileConfig(name="fleet", ec_curves=("P-384",), rsa_max_bits=0, ed25519=False))
    assert profile.key_types == policy.AllowedKeyTypes(("P-384",), 2048, 0, False)
    der = bytearray(cn().der)
    der[-5] ^= 0x01  # a P-256 key, refused by the profile, and a signature that does not verify
    with pytest.raises(PolicyViolation) as excinfo:
        policy.parse_csr(bytes(der), 65536, profile.key_types)
    assert excinfo.value.rule == "key-type"
