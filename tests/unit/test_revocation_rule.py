"""access.authorize_revocation: who may revoke which certificate, decided from the caller and the certificate alone."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from ca_daemon import access
from ca_daemon.errors import PermissionDenied
from ca_daemon.model import LINK_PROFILE, IssuedCertificate, link_device_id

NOW = datetime(2026, 11, 27, tzinfo=UTC)


def _certificate(profile: str, device_id: str = "dev-1") -> IssuedCertificate:
    return IssuedCertificate(
        serial=0x5A,
        issuer_key_id="ca-root-1",
        device_id=device_id,
        profile=profile,
        subject=f"CN={device_id}",
        not_before=NOW,
        not_after=NOW,
        der=b"",
        csr_sha256=b"",
        public_key_sha256=b"",
        request_id="r",
        created_at=NOW,
    )


def test_an_officer_revokes_any_certificate_whatever_its_profiles() -> None:
    for certificate in (_certificate("device"), _certificate(LINK_PROFILE, link_device_id("ca-root-2"))):
        access.authorize_revocation("off", {"officer"}, certificate, ())


def test_a_programmer_revokes_the_certificates_of_its_own_profiles_only() -> None:
    access.authorize_revocation("line3", {"programmer"}, _certificate("device"), ("device", "gateway"))
    with pytest.raises(PermissionDenied) as refused:
        access.authorize_revocation("line3", {"programmer"}, _certificate("sensor"), ("gateway", "device"))
    assert refused.value.rule == access.REVOKE_PROFILE
    message = str(refused.value)
    assert (
        "needs profile 'sensor', which caller 'line3' may not ask for (its [callers] profiles: device, gateway; roles: programmer)"
        in message
    )
    assert refused.value.expected == "a certificate of profile device or gateway, or role officer"


def test_a_programmer_not_listed_in_callers_revokes_nothing() -> None:
    with pytest.raises(PermissionDenied, match=r"its \[callers\] profiles: none;") as refused:
        access.authorize_revocation("fleet", {"programmer"}, _certificate("device"), ())
    assert refused.value.rule == access.REVOKE_PROFILE


def test_a_link_certificate_is_the_officers_even_when_a_profile_is_named_ca_link() -> None:
    link = _certificate(LINK_PROFILE, link_device_id("ca-root-2"))
    with pytest.raises(PermissionDenied) as refused:
        access.authorize_revocation("line3", {"programmer"}, link, (LINK_PROFILE,))
    assert refused.value.rule == access.REVOKE_CA_LINK
    assert "certifies CA key ca-root-2" in str(refused.value)
