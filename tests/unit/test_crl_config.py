"""The `[crl]` table and server.http_listen are validated at load time."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from ca_daemon import config
from ca_daemon.errors import ConfigError


def _load(tmp_path: Path, **overrides: str) -> config.Config:
    text = config.default_dev_config(token="t", key_label="k", listen="127.0.0.1:50051", workers=1, softhsm2_conf=tmp_path / "s.conf")
    for old, new in overrides.items():
        assert old in text, old
        text = text.replace(old, new)
    path = tmp_path / "ca.toml"
    path.write_text(text)
    return config.load(path)


def test_development_defaults(tmp_path: Path) -> None:
    cfg = _load(tmp_path)
    assert cfg.server.http_listen == "127.0.0.1:8080"
    assert cfg.crl.full_interval == timedelta(hours=24) and cfg.crl.full_validity == timedelta(days=7)
    assert cfg.crl.delta and cfg.crl.delta_interval == timedelta(minutes=5) and cfg.crl.delta_validity == timedelta(hours=1)
    assert cfg.crl.publish_on_revoke
    assert cfg.crl.directory == tmp_path / "crl"
    # The delta URL is derived from the CDP URL the leaves carry.
    assert cfg.ca.crl_distribution_points == ("http://127.0.0.1:8080/crl/k.crl",)
    assert cfg.crl.delta_distribution_points == ("http://127.0.0.1:8080/crl/k-delta.crl",)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("full_validity_seconds = 604800", "full_validity_seconds = 3600", "must exceed crl.full_interval_seconds"),
        ("delta_validity_seconds = 3600", "delta_validity_seconds = 300", "must exceed crl.delta_interval_seconds"),
        (
            "delta_interval_seconds = 300\ndelta_validity_seconds = 3600",
            "delta_interval_seconds = 90000\ndelta_validity_seconds = 100000",
            "shorter than crl.full_interval_seconds",
        ),
        ("full_interval_seconds = 86400", "full_interval_seconds = 10", "crl.full_interval_seconds = 10 is out of range"),
        ("publish_on_revoke = true", "publish_on_revoke = 1", "crl.publish_on_revoke must be true or false"),
        ('http_listen = "127.0.0.1:8080"', 'http_listen = "nowhere"', "server.http_listen"),
        ('directory = "crl"', 'directory = "crl"\ndelta_distribution_points = ["ftp://x/y.crl"]', "not an http"),
    ],
)
def test_bad_settings_name_themselves(tmp_path: Path, old: str, new: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _load(tmp_path, **{old: new})


def test_deltas_can_be_turned_off(tmp_path: Path) -> None:
    cfg = _load(tmp_path, **{"delta = true": "delta = false", "delta_interval_seconds = 300": "delta_interval_seconds = 90000"})
    assert not cfg.crl.delta
