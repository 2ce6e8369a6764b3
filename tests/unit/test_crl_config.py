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


@pytest.mark.parametrize(
    ("cdp", "delta"),
    [
        ("http://127.0.0.1:8080/crl/k.crl?v=1", "http://127.0.0.1:8080/crl/k-delta.crl?v=1"),
        ("http://127.0.0.1:8080/crl/k?v=1", "http://127.0.0.1:8080/crl/k-delta?v=1"),
        ("https://crl.example.net", "https://crl.example.net/delta.crl"),
        ("https://crl.example.net/?v=1", "https://crl.example.net/delta.crl?v=1"),
    ],
)
def test_the_default_delta_url_differs_from_the_full_one_in_its_path(tmp_path: Path, cdp: str, delta: str) -> None:
    """The server routes by path and ignores the query: "k.crl?v=1" made "k.crl?v=1-delta", served at the full CRL's
    path, so each delta replaced the full CRL there; a URL without a path made "crl.example.net-delta", another host."""
    cfg = _load(tmp_path, **{'"http://127.0.0.1:8080/crl/k.crl"': f'"{cdp}"'})
    assert cfg.crl.delta_distribution_points == (delta,)


@pytest.mark.parametrize("delta", ["http://127.0.0.1:8080/crl/k.crl?delta", "http://127.0.0.1:8080/crl/%6B.crl"])
def test_a_delta_url_at_the_path_of_a_full_crl_url_is_refused(tmp_path: Path, delta: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        _load(tmp_path, **{'directory = "crl"': f'directory = "crl"\ndelta_distribution_points = ["{delta}"]'})
    assert excinfo.value.message.startswith(
        f"crl.delta_distribution_points: {delta!r} has the path of ca.crl_distribution_points 'http://127.0.0.1:8080/crl/k.crl'"
    )
    assert "give the delta URL another path" in excinfo.value.message
    # Without deltas nothing is served there.
    _load(tmp_path, **{'directory = "crl"': f'directory = "crl"\ndelta_distribution_points = ["{delta}"]', "delta = true": "delta = false"})


@pytest.mark.parametrize(
    ("label", "url", "renamed"),
    [
        ("ca-root-1", "http://127.0.0.1:8080/crl/ca-root-1.crl", "http://127.0.0.1:8080/crl/ca-2.crl"),
        # The label is also part of the host, the port or the query: only the path names the key.
        ("1", "http://127.0.0.1:8080/crl/1.crl", "http://127.0.0.1:8080/crl/ca-2.crl"),
        ("ca", "http://ca/ca/ca.der", "http://ca/ca-2/ca-2.der"),
        ("crl", "http://crl.example.net/crl/crl.crl?key=crl", "http://crl.example.net/ca-2/ca-2.ca-2?key=crl"),
        ("80", "http://h:8080/crl/80.crl", "http://h:8080/crl/ca-2.crl"),
        ("k", "https://k.example", "https://k.example"),  # no path: nothing to rename
    ],
)
def test_another_keys_urls_rename_the_configured_label_in_the_path_alone(tmp_path: Path, label: str, url: str, renamed: str) -> None:
    """URLs for other keys replaced the configured label in the whole URL: a label that is also (part of) the host name
    or the port sent relying parties of every other key's certificates to another host."""
    from ca_daemon import authority

    cfg = _load(tmp_path, **{"object=k": f"object={label}", '"http://127.0.0.1:8080/crl/k.crl"': f'"{url}"'})
    assert authority.rename_urls(cfg, cfg.ca.crl_distribution_points, "ca-2") == (renamed,)
    assert authority.rename_urls(cfg, cfg.ca.crl_distribution_points, label) == (url,)
