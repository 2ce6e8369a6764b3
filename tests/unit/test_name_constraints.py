"""name_constraints against OpenSSL: for each chain constraint and certificate name, the module says a violation
exactly when `openssl verify` rejects the certificate (the TLS stack of the brokers that judge device certificates)."""

from __future__ import annotations

import ipaddress
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ca_daemon import name_constraints

_KEY = ec.generate_private_key(ec.SECP256R1())
_NOW = datetime.now(UTC)


def _dns(*names: str) -> list[x509.GeneralName]:
    return [x509.DNSName(n) for n in names]


def _uri(*names: str) -> list[x509.GeneralName]:
    return [x509.UniformResourceIdentifier(n) for n in names]


def _mail(*names: str) -> list[x509.GeneralName]:
    return [x509.RFC822Name(n) for n in names]


def _ip(*names: str) -> list[x509.GeneralName]:
    return [x509.IPAddress(ipaddress.ip_network(n) if "/" in n else ipaddress.ip_address(n)) for n in names]


def _dn(*texts: str) -> list[x509.GeneralName]:
    return [x509.DirectoryName(x509.Name.from_rfc4514_string(t)) for t in texts]


def _name(text: str) -> x509.Name:
    return x509.Name.from_rfc4514_string(text)


# (permitted, excluded, subject, SANs): each certificate is judged by openssl and by the module.
CASES: list[tuple[list[x509.GeneralName], list[x509.GeneralName], str, list[x509.GeneralName]]] = [
    # dNSName: a host and its subdomains, or (leading '.') subdomains only; on label boundaries; case folded
    (_dns("acme.example"), [], "CN=dev-1", _dns("a.acme.example")),
    (_dns("acme.example"), [], "CN=dev-1", _dns("acme.example")),
    (_dns("acme.example"), [], "CN=dev-1", _dns("xacme.example")),
    (_dns("acme.example"), [], "CN=dev-1", _dns("a.other.example")),
    (_dns("acme.example"), [], "CN=dev-1", _dns("A.ACME.Example")),
    (_dns(".acme.example"), [], "CN=dev-1", _dns("acme.example")),
    (_dns(".acme.example"), [], "CN=dev-1", _dns("a.acme.example")),
    (_dns("acme.example", "b.other.example"), [], "CN=dev-1", _dns("b.other.example")),
    ([], _dns("evil.example"), "CN=dev-1", _dns("x.evil.example")),
    ([], _dns("evil.example"), "CN=dev-1", _dns("x.acme.example")),
    (_dns("acme.example"), _dns("bad.acme.example"), "CN=dev-1", _dns("x.bad.acme.example")),
    # a host-like commonName is a dNSName when no dNSName SAN is there
    (_dns("acme.example"), [], "CN=dev1.acme.example", []),
    (_dns("acme.example"), [], "CN=dev1.other.example", []),
    (_dns("acme.example"), [], "CN=dev1.other.example", _dns("dev1.acme.example")),
    (_dns("acme.example"), [], "CN=dev-1", []),
    (_dns("acme.example"), [], "CN=dev_1.line-3", []),
    (_dns("acme.example"), [], "CN=dev..1", []),
    (_dns("acme.example"), [], "CN=dev-.1", []),
    (_dns("acme.example"), [], "CN=.dev1", []),
    (_dns("acme.example"), [], "CN=dev1.", []),
    (_dns("acme.example"), [], "CN=dev:1.x", []),
    ([], _dns("x"), "CN=dev1.x", []),
    # a constraint of one type says nothing about names of another
    (_dns("acme.example"), [], "CN=dev-1", _uri("urn:dev:1")),
    (_dns("acme.example"), [], "CN=dev-1", _mail("a@other.example")),
    # URI: the host after '//', up to ':' or '/'; a URN has none
    (_uri(".acme.example"), [], "CN=dev-1", _uri("https://d.acme.example/x")),
    (_uri(".acme.example"), [], "CN=dev-1", _uri("https://d.acme.example:8443/x")),
    (_uri(".acme.example"), [], "CN=dev-1", _uri("https://acme.example/x")),
    (_uri("acme.example"), [], "CN=dev-1", _uri("https://acme.example/x")),
    (_uri("acme.example"), [], "CN=dev-1", _uri("https://d.acme.example/x")),
    (_uri(".acme.example"), [], "CN=dev-1", _uri("urn:dev:1")),
    ([], _uri("evil.example"), "CN=dev-1", _uri("urn:dev:1")),
    ([], _uri("evil.example"), "CN=dev-1", _uri("mqtt://evil.example/t")),
    # rfc822Name: a mailbox, every mailbox of a host, or of the hosts of a domain; the subject's emailAddress too
    (_mail("acme.example"), [], "CN=dev-1", _mail("ops@acme.example")),
    (_mail("acme.example"), [], "CN=dev-1", _mail("ops@d.acme.example")),
    (_mail(".acme.example"), [], "CN=dev-1", _mail("ops@d.acme.example")),
    (_mail(".acme.example"), [], "CN=dev-1", _mail("ops@acme.example")),
    (_mail("ops@acme.example"), [], "CN=dev-1", _mail("ops@ACME.example")),
    (_mail("ops@acme.example"), [], "CN=dev-1", _mail("Ops@acme.example")),
    (_mail("acme.example"), [], "CN=dev-1,1.2.840.113549.1.9.1=ops@acme.example", []),
    (_mail("acme.example"), [], "CN=dev-1,1.2.840.113549.1.9.1=ops@other.example", []),
    # iPAddress: within the network, never across families
    (_ip("10.0.0.0/8"), [], "CN=dev-1", _ip("10.1.2.3")),
    (_ip("10.0.0.0/8"), [], "CN=dev-1", _ip("11.1.2.3")),
    (_ip("10.0.0.0/8"), [], "CN=dev-1", _ip("::1")),
    ([], _ip("192.168.0.0/16"), "CN=dev-1", _ip("192.168.4.4")),
    (_ip("fd00::/8"), [], "CN=dev-1", _ip("fd12::1")),
    # directoryName: the constraint's RDNs begin the subject, case and spacing folded
    (_dn("O=Acme"), [], "CN=dev-1,O=Acme", []),
    (_dn("O=Acme"), [], "CN=dev-1,O=acme", []),
    (_dn("O=Acme"), [], "CN=dev-1", []),
    (_dn("O=Acme"), [], "CN=dev-1,O=Acme Devices", []),
    (_dn("OU=Line 1,O=Acme"), [], "CN=dev-1,OU=line  1,O=Acme", []),
    (_dn("O=Äcme"), [], "CN=dev-1,O=äcme", []),  # only ASCII letters are folded
    (_dn("O=Äcme"), [], "CN=dev-1,O=Äcme", []),
    (_dn("O=Acme"), [], "CN=dev-1,O=\\ Acme\\ ", []),  # spaces around the value trimmed
    ([], _dn("O=Evil"), "CN=dev-1,O=Evil", []),
    ([], _dn("O=Evil"), "CN=dev-1,O=Acme", []),
]


def _ca(permitted: list[x509.GeneralName], excluded: list[x509.GeneralName]) -> x509.Certificate:
    subject = _name("CN=Constrained Root")
    constraints = x509.NameConstraints(permitted_subtrees=permitted or None, excluded_subtrees=excluded or None)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(_KEY.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_NOW - timedelta(hours=1))
        .not_valid_after(_NOW + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(_KEY.public_key()), critical=False)
        .add_extension(constraints, critical=True)
        .sign(_KEY, hashes.SHA256())
    )


def _leaf(ca: x509.Certificate, subject: str, sans: list[x509.GeneralName]) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_NOW - timedelta(minutes=5))
        .not_valid_after(_NOW + timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(_KEY, hashes.SHA256())


def _openssl_accepts(tmp_path: Path, ca: x509.Certificate, leaf: x509.Certificate) -> tuple[bool, str]:
    root, leaf_path = tmp_path / "root.pem", tmp_path / "leaf.pem"
    root.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    leaf_path.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    done = subprocess.run(["openssl", "verify", "-CAfile", str(root), str(leaf_path)], capture_output=True, text=True, check=False)
    return done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(("permitted", "excluded", "subject", "sans"), CASES)
def test_a_violation_is_found_exactly_when_openssl_rejects_the_certificate(
    tmp_path: Path, permitted: list[x509.GeneralName], excluded: list[x509.GeneralName], subject: str, sans: list[x509.GeneralName]
) -> None:
    ca = _ca(permitted, excluded)
    leaf = _leaf(ca, subject, sans)
    accepted, output = _openssl_accepts(tmp_path, ca, leaf)
    chain = name_constraints.from_chain([ca])
    assert chain is not None
    problem = chain.violation(leaf.subject, sans)
    assert (problem is None) == accepted, (problem, output)
    if problem is not None:
        assert "Constrained Root" in problem.message and "nameConstraints" in problem.message


def test_the_constraints_of_every_certificate_of_the_chain_apply(tmp_path: Path) -> None:
    """An intermediate's and its root's constraints both hold: a name must fit each."""
    root = _ca(_dns("acme.example"), [])
    intermediate_key = ec.generate_private_key(ec.SECP256R1())
    intermediate = (
        x509.CertificateBuilder()
        .subject_name(_name("CN=Line CA"))
        .issuer_name(root.subject)
        .public_key(intermediate_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_NOW - timedelta(hours=1))
        .not_valid_after(_NOW + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.NameConstraints(permitted_subtrees=None, excluded_subtrees=_dns("lab.acme.example")), critical=True)
        .sign(_KEY, hashes.SHA256())
    )
    chain = name_constraints.from_chain([intermediate, root])
    assert chain is not None
    assert chain.violation(_name("CN=dev-1"), _dns("d.line.acme.example")) is None
    outside_root = chain.violation(_name("CN=dev-1"), _dns("d.other.example"))
    assert outside_root is not None and "Constrained Root" in outside_root.message and outside_root.field == "san.dns"
    in_excluded = chain.violation(_name("CN=dev-1"), _dns("d.lab.acme.example"))
    assert in_excluded is not None and "Line CA" in in_excluded.message and "excluded" in in_excluded.message
    assert name_constraints.from_chain([_leaf(root, "CN=x", [])]) is None  # no constraints anywhere: nothing to check


def test_an_intermediate_is_judged_without_the_commonname_rule() -> None:
    """OpenSSL reads a host-like commonName as a dNSName only in the end-entity certificate."""
    chain = name_constraints.from_chain([_ca(_dns("acme.example"), [])])
    assert chain is not None
    assert chain.violation(_name("CN=Factory CA.other.example"), [], leaf=False) is None
    problem = chain.violation(_name("CN=ca.other.example"), [], leaf=True)
    assert problem is not None and problem.field == "subject.commonName"


def test_the_email_address_attribute_is_checked_as_openssl_needs_it() -> None:
    chain = name_constraints.from_chain([_ca(_mail("acme.example"), [])])
    assert chain is not None
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev-1"), x509.NameAttribute(NameOID.EMAIL_ADDRESS, "noat")])
    problem = chain.violation(subject, [])
    assert problem is not None and "has no '@'" in problem.message and problem.field == "subject.emailAddress"
