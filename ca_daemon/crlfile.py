"""A relying party's CRL file kept current: the full CRLs of the CAs it trusts, fetched over HTTP, checked, installed whole.

Mosquitto reads its `crlfile` only at start and at a reload, and OpenSSL refuses every client
certificate once that CRL's nextUpdate has passed ("CRL has expired"). The daemon's full CRL is
valid 7 days by default, so a file written once after a revocation and never again takes the
whole fleet offline a week later. `ca-daemon crl fetch` (run hourly by
deploy/mosquitto-crl-refresh.timer) replaces the file with the current CRLs, and only with CRLs
the broker can rely on:

- each is a full CRL (a delta is refused: OpenSSL without extended CRL support would take it for
  a complete one, see README "Revocation and CRLs"), current now, and signed by a CA certificate
  of the broker's own cafile (issuer name, key usage cRLSign if the certificate has key usage, signature);
- none is older than the installed CRL of the same CA (a lower CRL number or an earlier
  thisUpdate): a stale mirror or cache cannot un-revoke a device;
- all or nothing: one refused CRL leaves the installed file as it was, and the file is replaced
  by a rename (files.write_atomically), so no reader ever sees a part of it;
- unchanged content leaves the file untouched and reloads nothing. After a change the caller's
  reload runs; if it fails, the previous file is put back, so that the next run tries again
  rather than find the file current and leave the broker on its old CRL until that expires.

The CRLs come over plain HTTP from the CDP URLs (what every relying party reads): no client
certificate, which would be one more thing on the broker's host to expire. Their signature, not
the channel, is what makes them trustworthy. A leaf module for users: no server-side imports.
"""

from __future__ import annotations

import http.client
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ca_daemon.files import write_atomically
from ca_daemon.verify import Fetcher, crl_number, delta_base, http_fetch

_PEM_CRL = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", re.S)


class CrlRefused(ValueError):
    """A CRL that must not be installed, or a refresh that could not finish; the installed file is as it was."""


@dataclass(frozen=True)
class FetchedCrl:
    url: str
    crl: x509.CertificateRevocationList
    number: int

    def describe(self) -> str:
        return (
            f"full CRL {self.number} of {self.crl.issuer.rfc4514_string()} (thisUpdate {self.crl.last_update_utc.isoformat()}, "
            f"nextUpdate {_next_update(self.crl).isoformat()}) from {self.url}"
        )


@dataclass(frozen=True)
class Refreshed:
    """What a refresh found: the CRLs now in the file, and whether the file (and so the broker) changed."""

    crls: list[FetchedCrl]
    changed: bool


def fetch_checked(url: str, trusted: Sequence[x509.Certificate], now: datetime, fetch: Fetcher = http_fetch) -> FetchedCrl:
    """The full CRL at url, once it is shown to be current and signed by one of the trusted CA certificates."""
    try:
        status, body, _etag = fetch(url, "")
    except (OSError, ValueError, http.client.HTTPException) as exc:  # refused, HTTP 404, a timeout, too big or too slow
        # One line for the journal: urllib's redirect-loop error spans three, a bad status line ends in the server's CRLF.
        raise CrlRefused(f"cannot fetch the CRL at {url}: {' '.join(str(exc).split())}") from None
    if status != 200:
        raise CrlRefused(f"the CRL at {url} answered HTTP {status}")
    try:
        crl = x509.load_pem_x509_crl(body) if body.lstrip().startswith(b"-----BEGIN") else x509.load_der_x509_crl(body)
        issuer = crl.issuer.rfc4514_string()  # read on first use: a name that is not UTF-8 fails here, not at parse
    except ValueError as exc:
        raise CrlRefused(f"what {url} serves is not a CRL: {exc}") from None
    if delta_base(crl) is not None:
        raise CrlRefused(f"{url} serves a delta CRL of {issuer}: give the full CRL's URL (OpenSSL would take a delta for a complete CRL)")
    if not any(_signed_by(crl, cert) for cert in trusted):
        raise CrlRefused(f"the CRL at {url} (issuer {issuer}) is not signed by any CA certificate the broker trusts (its cafile)")
    if crl.last_update_utc > now:
        raise CrlRefused(
            f"the CRL at {url} has thisUpdate {crl.last_update_utc.isoformat()}, after this host's clock ({now.isoformat()}): "
            "OpenSSL would refuse it as not yet valid"
        )
    if _next_update(crl) <= now:
        raise CrlRefused(f"the CRL at {url} expired at {_next_update(crl).isoformat()} (nextUpdate): is the CA publishing?")
    return FetchedCrl(url, crl, crl_number(crl))


def installed_crls(path: Path) -> list[x509.CertificateRevocationList]:
    """The CRLs in the file (PEM, one after another); none if it is missing, and a block that does not parse is skipped."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    crls = []
    for block in _PEM_CRL.findall(data):
        try:
            crls.append(x509.load_pem_x509_crl(block))
        except ValueError:
            continue  # whatever broke it, verified CRLs replace it
    return crls


def refresh(
    urls: Sequence[str],
    trusted: Sequence[x509.Certificate],
    path: Path,
    now: datetime,
    *,
    reload: Callable[[], None] | None = None,
    fetch: Fetcher = http_fetch,
) -> Refreshed:
    """Install the full CRLs at urls into path (PEM, in the order of urls) if they differ from what it holds, then reload.

    CrlRefused (or OSError) leaves path as it was. reload raises if the broker could not be told; path then
    gets its previous content back.
    """
    if not urls:
        raise CrlRefused("no CRL URL given")
    fetched = [fetch_checked(url, trusted, now, fetch) for url in urls]
    by_issuer: dict[bytes, FetchedCrl] = {}
    for item in fetched:
        issuer = item.crl.issuer.public_bytes()
        if issuer in by_issuer:
            raise CrlRefused(
                f"{by_issuer[issuer].url} and {item.url} both serve a CRL of {item.crl.issuer.rfc4514_string()}: give one URL per CA"
            )
        by_issuer[issuer] = item
    for old in installed_crls(path):
        new = by_issuer.get(old.issuer.public_bytes())
        if new is None or not any(_signed_by(old, cert) and _signed_by(new.crl, cert) for cert in trusted):
            continue  # a CA no URL names any more, or a key the broker no longer trusts: nothing to compare with
        if new.number < crl_number(old) or new.crl.last_update_utc < old.last_update_utc:
            raise CrlRefused(
                f"{new.url} serves CRL {new.number} of {new.crl.issuer.rfc4514_string()} (thisUpdate "
                f"{new.crl.last_update_utc.isoformat()}), older than the installed CRL {crl_number(old)} (thisUpdate "
                f"{old.last_update_utc.isoformat()}): a stale mirror or cache? {path} stays as it was"
            )
    content = b"".join(item.crl.public_bytes(serialization.Encoding.PEM) for item in fetched)
    try:
        previous: bytes | None = path.read_bytes()
    except FileNotFoundError:
        previous = None
    if content == previous:
        return Refreshed(fetched, changed=False)
    write_atomically(path, content)
    if reload is not None:
        try:
            reload()
        except BaseException:
            if previous is not None:  # the broker still holds the old CRLs; the next run finds a change and reloads again
                write_atomically(path, previous)
            raise
    return Refreshed(fetched, changed=True)


def _signed_by(crl: x509.CertificateRevocationList, cert: x509.Certificate) -> bool:
    if crl.issuer != cert.subject:
        return False
    try:
        if not cert.extensions.get_extension_for_class(x509.KeyUsage).value.crl_sign:
            return False  # OpenSSL would not take this certificate's CRLs either
    except x509.ExtensionNotFound:
        pass
    try:
        return crl.is_signature_valid(cert.public_key())  # type: ignore[arg-type]
    except TypeError:  # a key type that signs no CRL
        return False


def _next_update(crl: x509.CertificateRevocationList) -> datetime:
    next_update = crl.next_update_utc
    if next_update is None:
        return datetime.max.replace(tzinfo=crl.last_update_utc.tzinfo)
    return next_update
