"""The nameConstraints of a CA's chain, applied to the names a certificate would carry. Pure: no I/O.

A CA certificate from an outside parent may carry nameConstraints (RFC 5280 4.2.1.10), in it or
in a parent: every certificate below must then name only what they permit and nothing they
exclude, or relying parties reject it ("permitted subtree violation"). The daemon checks before it
signs, so that it never issues a certificate that fails at every relying party.

The rules are OpenSSL's (crypto/x509/v3_ncons.c), the TLS stack of Mosquitto and most brokers,
which RFC 5280 leaves room to read in several ways: the subject is a directoryName (and its
emailAddress attributes rfc822Names); a leaf's commonName that looks like a host name (two or more
labels) is a dNSName too when the certificate has no dNSName SAN; a URI's host is what follows
"scheme://" up to the next ':' or '/', and a URI without "//" (a URN) cannot be checked against a
URI constraint at all, which OpenSSL treats as a violation. A constraint of another type is only
ever a violation of names of that type. Hand-written: `cryptography` parses the extension but
offers no check of a name against it, and its verifier needs a signed certificate.
"""

from __future__ import annotations

import ipaddress
import re
import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import NameOID

_SAN_KINDS: dict[type, str] = {
    x509.DNSName: "dns",
    x509.RFC822Name: "email",
    x509.UniformResourceIdentifier: "uri",
    x509.IPAddress: "ip",
    x509.DirectoryName: "dirname",
}
_ASCII_SPACE = re.compile(r"[ \t\n\v\f\r]+")
_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)
_IpValue = ipaddress.IPv4Address | ipaddress.IPv6Address | ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class CaConstraints:
    """One CA certificate's nameConstraints."""

    ca_subject: str
    permitted: tuple[x509.GeneralName, ...]
    excluded: tuple[x509.GeneralName, ...]


@dataclass(frozen=True)
class Violation:
    """A name the chain's constraints forbid: which field of the certificate holds it, and why."""

    field: str
    message: str


@dataclass(frozen=True)
class ChainConstraints:
    """Every nameConstraints extension of a chain, each applying to all certificates below its CA."""

    constraints: tuple[CaConstraints, ...]

    def violation(self, subject: x509.Name, sans: Sequence[x509.GeneralName], *, leaf: bool = True) -> Violation | None:
        """The first name of a certificate with this subject and these SANs that breaks the chain's constraints, or None.

        leaf: an end-entity certificate, whose host-name-like commonName counts as a dNSName.
        """
        names = list(names_to_check(subject, sans, leaf=leaf))
        for ca in self.constraints:
            for field, where, name in names:
                problem = _check(ca, where, name)
                if problem is not None:
                    return Violation(field, problem)
        return None


def from_chain(certificates: Iterable[x509.Certificate]) -> ChainConstraints | None:
    """The chain's constraints, or None when no certificate has any (the usual case: nothing to check per Sign)."""
    found: list[CaConstraints] = []
    for certificate in certificates:
        try:
            value = certificate.extensions.get_extension_for_class(x509.NameConstraints).value
        except x509.ExtensionNotFound:
            continue
        found.append(
            CaConstraints(
                certificate.subject.rfc4514_string(),
                tuple(value.permitted_subtrees or ()),
                tuple(value.excluded_subtrees or ()),
            )
        )
    return ChainConstraints(tuple(found)) if found else None


def names_to_check(subject: x509.Name, sans: Sequence[x509.GeneralName], *, leaf: bool) -> Iterable[tuple[str, str, x509.GeneralName]]:
    """(field, how a person would call it, the name) for every name a relying party holds against the constraints."""
    if len(subject) > 0:
        yield "subject", "subject", x509.DirectoryName(subject)
        for attribute in subject.get_attributes_for_oid(NameOID.EMAIL_ADDRESS):
            yield "subject.emailAddress", "subject emailAddress", x509.RFC822Name(str(attribute.value))
    for san in sans:
        kind = _SAN_KINDS.get(type(san), type(san).__name__)
        yield f"san.{kind}", f"{kind} SAN", san
    if leaf and not any(isinstance(san, x509.DNSName) for san in sans):
        for attribute in subject.get_attributes_for_oid(NameOID.COMMON_NAME):
            value = str(attribute.value)
            if looks_like_host_name(value):
                yield "subject.commonName", "commonName (a host name to relying parties)", x509.DNSName(value)


def looks_like_host_name(value: str) -> bool:
    """OpenSSL's test of a commonName: ASCII letters, digits, '_', inner '-' and '.', with no '.' next to '.' or '-',
    and at least one '.'."""
    if not value or not value.isascii() or value[0] in "-." or value[-1] in "-.":
        return False
    if ".." in value or "-." in value or ".-" in value:
        return False
    return "." in value and all(c.isalnum() or c in "_-." for c in value)


def _check(ca: CaConstraints, where: str, name: x509.GeneralName) -> str | None:
    permitted = [base for base in ca.permitted if type(base) is type(name)]
    shown = f"{where} {_text(name)!r}"
    if permitted:
        results = [_matches(name, base) for base in permitted]
        unsupported = next((r for r in results if isinstance(r, str)), None)
        if not any(r is True for r in results):
            reason = unsupported or "outside every subtree it permits (" + ", ".join(_text(b) for b in permitted) + ")"
            return f"{shown} breaks the nameConstraints of CA {ca.ca_subject!r}: {reason}"
    for base in ca.excluded:
        if type(base) is not type(name):
            continue
        result = _matches(name, base)
        if result is True:
            return f"{shown} breaks the nameConstraints of CA {ca.ca_subject!r}: it is in the excluded subtree {_text(base)!r}"
        if isinstance(result, str):
            return f"{shown} breaks the nameConstraints of CA {ca.ca_subject!r}: {result}"
    return None


def _matches(name: x509.GeneralName, base: x509.GeneralName) -> bool | str:
    """True when name is within base's subtree, False when not, a reason when the two cannot be compared."""
    if isinstance(name, x509.DNSName) and isinstance(base, x509.DNSName):
        return _dns_within(name.value, base.value)
    if isinstance(name, x509.RFC822Name) and isinstance(base, x509.RFC822Name):
        return _email_within(name.value, base.value)
    if isinstance(name, x509.UniformResourceIdentifier) and isinstance(base, x509.UniformResourceIdentifier):
        return _uri_within(name.value, base.value)
    if isinstance(name, x509.IPAddress) and isinstance(base, x509.IPAddress):
        return _ip_within(name.value, base.value)
    if isinstance(name, x509.DirectoryName) and isinstance(base, x509.DirectoryName):
        return _dn_within(name.value, base.value)
    return "relying parties cannot check a name of this type against a constraint"


def _dns_within(name: str, base: str) -> bool:
    """base "" permits every name; "example.com" that host and its subdomains; ".example.com" its subdomains only."""
    if not base:
        return True
    name, base = name.lower(), base.lower()
    if len(name) > len(base):
        suffix_at = len(name) - len(base)
        return name.endswith(base) and (base.startswith(".") or name[suffix_at - 1] == ".")
    return name == base


def _email_within(name: str, base: str) -> bool | str:
    """base "user@host" that mailbox; "host" every mailbox at host; ".domain" every mailbox at a host of domain."""
    if "@" not in name:
        return f"the mailbox {name!r} has no '@'"
    local, _, host = name.partition("@")
    if "@" not in base and base.startswith("."):
        return len(name) > len(base) and name.lower().endswith(base.lower())
    if "@" in base:
        base_local, _, base = base.partition("@")
        if base_local and base_local != local:  # the local part compares case-sensitively
            return False
    return host.lower() == base.lower()


def _uri_within(name: str, base: str) -> bool | str:
    """The URI's host against base: "host" that host only, ".domain" the hosts of domain."""
    scheme_end = name.find(":")
    if scheme_end < 0 or name[scheme_end + 1 : scheme_end + 3] != "//":
        return f"the URI {name!r} has no '//' host part, so a URI constraint cannot be checked (OpenSSL rejects it)"
    rest = name[scheme_end + 3 :]
    cut = rest.find(":")
    if cut < 0:
        cut = rest.find("/")
    host = rest if cut < 0 else rest[:cut]
    if not host:
        return f"the URI {name!r} has an empty host"
    if base.startswith("."):
        return len(host) > len(base) and host.lower().endswith(base.lower())
    return host.lower() == base.lower()


def _ip_within(name: _IpValue, base: _IpValue) -> bool | str:
    """An address within base's network (an IPv4 address never within an IPv6 network, nor the other way)."""
    if not isinstance(name, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return "an iPAddress SAN must be one address"
    if not isinstance(base, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return "an iPAddress constraint must be an address and mask"
    if isinstance(name, ipaddress.IPv4Address) and isinstance(base, ipaddress.IPv4Network):
        return name in base
    if isinstance(name, ipaddress.IPv6Address) and isinstance(base, ipaddress.IPv6Network):
        return name in base
    return False


def _dn_within(name: x509.Name, base: x509.Name) -> bool:
    """base's RDNs are the first RDNs of name, compared as OpenSSL compares names (case and spacing folded)."""
    name_rdns, base_rdns = list(name.rdns), list(base.rdns)
    if len(base_rdns) > len(name_rdns):
        return False
    return all(_canonical_rdn(a) == _canonical_rdn(b) for a, b in zip(name_rdns, base_rdns, strict=False))


def _canonical_rdn(rdn: x509.RelativeDistinguishedName) -> frozenset[tuple[str, object]]:
    return frozenset((attribute.oid.dotted_string, _canonical_value(attribute.value)) for attribute in rdn)


def _canonical_value(value: str | bytes) -> object:
    """As OpenSSL's canonical form: ASCII whitespace trimmed and each run made one space, ASCII letters lowercased."""
    if isinstance(value, bytes):
        return value
    return " ".join(_ASCII_SPACE.split(value.strip(" \t\n\v\f\r"))).translate(_ASCII_LOWER)


def _text(name: x509.GeneralName) -> str:
    if isinstance(name, x509.DirectoryName):
        return name.value.rfc4514_string()
    if isinstance(name, x509.IPAddress):
        return str(name.value)
    value = name.value
    return value if isinstance(value, str) else repr(value)
