"""Property tests of the pure policy layer: random subjects and SANs.

A decision is reached exactly when an independent oracle says every rule holds, and the
certificate built from it never carries a name or extension the profile forbids.
"""

from __future__ import annotations

import re
import unicodedata
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ca_daemon import issuer, policy
from ca_daemon.config import ProfileConfig
from ca_daemon.errors import CaError
from tests import csr_forge as f

KEY = ec.generate_private_key(ec.SECP256R1())
CA_KEY = ec.generate_private_key(ec.SECP256R1())
ROOT = issuer.build_root(
    x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Prop CA")]), CA_KEY.public_key(), datetime.now(UTC), timedelta(days=9)
).sign(CA_KEY, hashes.SHA256())
PROFILE = policy.build_profile(
    ProfileConfig(
        name="fleet",
        device_id_pattern="^[a-z0-9-]{3,32}$",
        subject_required=("CN", "O"),
        subject_allowed=(("O", "^Example Corp$"),),
        san_allowed=(("dns", r"^{device_id}\.devices\.example\.com$"), ("uri", "^urn:dev:ops:{device_id}$")),
        san_templates=("urn:dev:ops:{device_id}",),
    )
)
OIDS = {"CN": f.CN, "O": f.O, "OU": f.OU}
SAN_TAGS = {"dns": 0x82, "uri": 0x86, "email": 0x81, "ip": 0x87}

device_ids = st.one_of(st.from_regex(r"[a-z0-9-]{3,32}", fullmatch=True), st.text(min_size=0, max_size=70))
issued_count = [0]
values = st.one_of(st.just("Example Corp"), st.text(max_size=70))
random_attribute = st.tuples(st.sampled_from(["CN", "O", "OU"]), values, st.sampled_from([f.UTF8, f.PRINTABLE, f.BMP]))
# Biased towards subjects and SANs the profile accepts, so both outcomes are exercised.
attributes = st.one_of(
    st.lists(random_attribute, max_size=3),
    st.tuples(st.just("O"), st.just("Example Corp"), st.sampled_from([f.UTF8, f.PRINTABLE])).map(lambda a: [a]),
)
san_values = st.sampled_from(
    ["{id}.devices.example.com", "urn:dev:ops:{id}", "*.{id}.devices.example.com", "x.example", "urn:dev:ops:other"]
)
sans = st.lists(
    st.tuples(st.sampled_from(["dns", "uri", "dns", "uri", "email", "ip"]), st.one_of(san_values, st.text(max_size=20))), max_size=3
)


def _encodable(value: str, tag: int) -> bool:
    if tag == f.PRINTABLE:
        return re.fullmatch(r"[A-Za-z0-9 '()+,\-./:=?]*", value) is not None
    return not any(0xD800 <= ord(c) <= 0xDFFF for c in value)


def _oracle(subject: list[tuple[str, str, int]], requested: list[tuple[str, str]]) -> bool:
    """Whether the fleet profile must issue: every rule, restated independently."""
    if any(tag == f.BMP for _, _, tag in subject):
        return False
    for _, value, _ in subject:
        if any(unicodedata.category(c) in {"Cc", "Cf", "Zl", "Zp", "Co", "Cs", "Cn"} for c in value):
            return False
    names = [n for n, _, _ in subject]
    if names.count("CN") != 1 or "O" not in names:
        return False
    device_id = next(v for n, v, _ in subject if n == "CN")
    if re.fullmatch(r"[a-z0-9-]{3,32}", device_id) is None:
        return False
    for name, value, _ in subject:
        if not value.strip() or len(value) > 64:
            return False
        if name == "OU" or (name == "O" and value != "Example Corp"):
            return False
    if names.count("O") > 1:
        return False
    for kind, value in requested:
        if kind not in {"dns", "uri"} or "*" in value:
            return False
        expected = f"{device_id}.devices.example.com" if kind == "dns" else f"urn:dev:ops:{device_id}"
        if value != expected:
            return False
    return True


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(device_id=device_ids, subject=attributes, requested=sans)
def test_issued_only_if_every_rule_holds_and_never_with_a_forbidden_name(
    device_id: str, subject: list[tuple[str, str, int]], requested: list[tuple[str, str]]
) -> None:
    subject = [("CN", device_id, f.UTF8), *subject]
    subject = [(n, v, t) for n, v, t in subject if _encodable(v, t)]
    requested = [(k, v.replace("{id}", device_id)) for k, v in requested]
    requested = [(k, v) for k, v in requested if v.isascii() and (k != "ip" or len(v) in (4, 16))]
    general_names = f.seq(*(f.tlv(SAN_TAGS[k], v.encode()) for k, v in requested))
    extensions = [f.extension("2.5.29.17", general_names)] if requested else []
    der = f.forge_csr(KEY, f.simple_name(*((OIDS[n], v, t) for n, v, t in subject)), extensions=extensions)
    try:
        decision = policy.decide(policy.parse_csr(der, 65536), PROFILE)
    except CaError:
        assert not _oracle(subject, requested)
        return
    assert _oracle(subject, requested), (subject, requested)
    issued_count[0] += 1
    cert = issuer.build_leaf(decision, ROOT, issuer.new_serial(), datetime.now(UTC), timedelta(minutes=1), issuer.LeafUrls()).sign(
        CA_KEY, hashes.SHA256()
    )
    assert {a.oid for a in cert.subject} <= {NameOID.COMMON_NAME, NameOID.ORGANIZATION_NAME}
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert not usage.key_cert_sign and not usage.crl_sign
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    device = decision.device_id
    for name in names:
        assert isinstance(name, x509.DNSName | x509.UniformResourceIdentifier)
        assert name.value in {f"{device}.devices.example.com", f"urn:dev:ops:{device}"}
    known = {"basicConstraints", "keyUsage", "extendedKeyUsage", "subjectKeyIdentifier", "authorityKeyIdentifier", "subjectAltName"}
    assert {e.oid._name for e in cert.extensions} <= known


def test_the_property_run_reached_both_outcomes() -> None:
    # Runs after the property test in file order: a generator that never produced an
    # acceptable request would make the property vacuous.
    assert issued_count[0] > 10
