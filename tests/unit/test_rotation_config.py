"""Issue 7: the `[rotation]` settings, short profile validities and link certificates (pure code)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from ca_daemon import config, issuer
from ca_daemon.errors import ConfigError
from tests.unit.test_config import _dev, _write


def test_rotation_defaults_and_settings(tmp_path: Path) -> None:
    cfg = config.load(_write(tmp_path, _dev(tmp_path)))
    assert cfg.rotation.approval_window == timedelta(days=1)
    assert cfg.rotation.prepublication == timedelta(days=7)
    assert cfg.rotation.poll_interval == timedelta(seconds=1)
    text = _dev(tmp_path, **{"prepublication_seconds = 604800": "prepublication_seconds = 5\npoll_interval_ms = 200"})
    cfg = config.load(_write(tmp_path, text))
    assert cfg.rotation.prepublication == timedelta(seconds=5) and cfg.rotation.poll_interval == timedelta(milliseconds=200)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("approval_window_seconds = 86400", "approval_window_seconds = 1", "rotation.approval_window_seconds = 1 is out of range"),
        ("prepublication_seconds = 604800", "prepublication_seconds = -1", "rotation.prepublication_seconds = -1 is out of range"),
    ],
)
def test_rotation_settings_out_of_range_are_refused(tmp_path: Path, old: str, new: str, message: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        config.load(_write(tmp_path, _dev(tmp_path, **{old: new})))
    assert message in excinfo.value.message


def test_profile_validity_seconds_overrides_days(tmp_path: Path) -> None:
    cfg = config.load(_write(tmp_path, _dev(tmp_path, **{"validity_days = 365": "validity_days = 365\nvalidity_seconds = 30"})))
    assert cfg.profile("").validity == timedelta(seconds=30)


def _root(name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    return key, issuer.build_root(issuer.parse_subject(f"CN={name}"), key.public_key(), now, timedelta(days=30)).sign(key, hashes.SHA256())


def test_link_certificates_chain_each_generation_to_the_other() -> None:
    old_key, old_root = _root("Root 1")
    new_key, new_root = _root("Root 2")
    now = datetime.now(UTC)
    old_signs_new = issuer.build_link(new_root, old_root, now, ("http://ca.example/crl/root-1.crl",)).sign(old_key, hashes.SHA256())
    new_signs_old = issuer.build_link(old_root, new_root, now).sign(new_key, hashes.SHA256())
    old_signs_new.verify_directly_issued_by(old_root)
    new_signs_old.verify_directly_issued_by(new_root)
    assert old_signs_new.subject == new_root.subject and old_signs_new.public_key() == new_root.public_key()
    assert new_signs_old.subject == old_root.subject and new_signs_old.public_key() == old_root.public_key()
    assert old_signs_new.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert old_signs_new.not_valid_after_utc <= min(old_root.not_valid_after_utc, new_root.not_valid_after_utc)
    ski = old_signs_new.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == new_root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = old_signs_new.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == old_root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
