"""Configuration is validated at load time and names the bad setting."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from ca_daemon import config, issuer, policy
from ca_daemon.errors import ConfigError
from ca_daemon.lint import pkilint_findings


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ca.toml"
    path.write_text(text)
    return path


def _dev(tmp_path: Path, **overrides: str) -> str:
    text = config.default_dev_config(
        token="t", key_label="k", listen="127.0.0.1:50051", workers=2, softhsm2_conf=tmp_path / "softhsm2.conf"
    )
    for old, new in overrides.items():
        assert old in text
        text = text.replace(old, new)
    return text


def test_the_development_configuration_loads(tmp_path: Path) -> None:
    cfg = config.load(_write(tmp_path, _dev(tmp_path)))
    assert cfg.server.dev_mode
    assert cfg.hsm.token == "t"
    assert cfg.hsm.pin.file == tmp_path / "pins" / "user.pin"
    assert cfg.store.url == f"sqlite:///{tmp_path / 'ca.db'}"
    assert cfg.profile("").name == "device"


_H = "http://127.0.0.1:8080"
_CDP = f'"{_H}/crl/k.crl"'  # the CRL and CA URLs of the development configuration
_AIA = f'"{_H}/ca/k.der"'


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ('listen = "127.0.0.1:50051"', 'listen = "0.0.0.0:50051"', "not a loopback address"),
        ('[metrics]\nlisten = ""', '[metrics]\nlisten = "0.0.0.0:9464"', "metrics.listen = '0.0.0.0:9464' is not a loopback address"),
        ("dev_mode = true", "dev_mode = false", "needs mTLS"),
        ('pin_file = "pins/user.pin"', 'pin_file = "pins/user.pin"\npin_env = "X"', "exactly one of pin_file or pin_env"),
        ('key = "pkcs11:', 'key = "file:', "pkcs11: URI"),
        (f'module = "{config.DEFAULT_SOFTHSM_MODULE}"', 'module = ""', "hsm.module is empty: name the PKCS#11 library"),
        ("workers = 2", "workers = 0", "server.workers = 0 is out of range"),
        ("workers = 2", "workers = 2\nhttp_connections_per_client = 0", "server.http_connections_per_client = 0 is out of range"),
        ("workers = 2", "workers = 2\nhttp_connections_per_client = 513", "server.http_connections_per_client = 513 is out of range"),
        ("workers = 2", 'workers = "two"', "server.workers must be an integer"),
        ("workers = 2", 'workers = 2\ncpu_affinity = "always"', "server.cpu_affinity = 'always': use one of auto, off"),
        ("workers = 2", 'workers = 2\ncpu_scheduling = "fifo"', "server.cpu_scheduling = 'fifo': use one of batch, normal"),
        ('url = "sqlite:///ca.db"', 'url = "mysql://x"', "use sqlite:///PATH or postgresql://"),
        ('url = "sqlite:///ca.db"', 'url = "sqlite:///"', "names a directory, not a database file"),
        ('url = "sqlite:///ca.db"', 'url = "sqlite:///."', "names a directory, not a database file"),
        ('url = "sqlite:///ca.db"', 'url = "sqlite:///new/"', "names a directory, not a database file"),
        ("validity_days = 365", "validity_days = 365\nmax_validity_days = 30", "validity_days (365) exceeds max_validity_days (30)"),
        (
            "validity_days = 365",
            "validity_seconds = 100000\nmax_validity_days = 1",
            "validity_seconds (100000) exceeds max_validity_days (1)",
        ),
        ('default_profile = "device"', 'default_profile = "nope"', "is not one of the profiles"),
        # CRL and CA URLs the HTTP server would answer 400 (see http_paths), or whose fragment no client sends.
        (
            _CDP,
            f'"{_H}/crl/../k.crl"',
            f"ca.crl_distribution_points: '{_H}/crl/../k.crl' cannot be served over HTTP: the path has a dot-segment",
        ),
        (
            _CDP,
            f'"{_H}/crl/%2e%2E/k.crl"',
            f"ca.crl_distribution_points: '{_H}/crl/%2e%2E/k.crl' cannot be served over HTTP: the path has a dot-segment",
        ),
        (
            _CDP,
            f'"{_H}/crl/./k.crl"',
            f"ca.crl_distribution_points: '{_H}/crl/./k.crl' cannot be served over HTTP: the path has a dot-segment",
        ),
        (
            _CDP,
            f'"{_H}/crl%2Fk.crl"',
            f"ca.crl_distribution_points: '{_H}/crl%2Fk.crl' cannot be served over HTTP: the path has an encoded slash or NUL",
        ),
        (
            _CDP,
            f'"{_H}/crl/k%00.crl"',
            f"ca.crl_distribution_points: '{_H}/crl/k%00.crl' cannot be served over HTTP: the path has an encoded slash or NUL",
        ),
        (_CDP, f'"{_H}/crl/[k].crl"', f"ca.crl_distribution_points: '{_H}/crl/[k].crl' cannot be served over HTTP: the path has #, [ or ]"),
        (
            _CDP,
            f'"{_H}/crl/k#1.crl"',
            f"ca.crl_distribution_points: '{_H}/crl/k#1.crl' cannot be served over HTTP: a fragment (#1.crl) is never sent",
        ),
        (_CDP, '"http://[127.0.0.1/crl/k.crl"', "ca.crl_distribution_points: 'http://[127.0.0.1/crl/k.crl' is not a valid URL"),
        (
            _AIA,
            f'"{_H}/ca/k%zz.der"',
            f"ca.ca_issuers_urls: '{_H}/ca/k%zz.der' cannot be served over HTTP: the path has a % not followed by two hex",
        ),
        (
            _AIA,
            f'"{_H}/ca/k%C3%28.der"',
            f"ca.ca_issuers_urls: '{_H}/ca/k%C3%28.der' cannot be served over HTTP: the path does not decode to UTF-8",
        ),
        (
            _AIA,
            f'"{_H}/ca/kä.der"',
            f"ca.ca_issuers_urls: '{_H}/ca/kä.der' cannot be served over HTTP: the request target has a character other than visible ASCII",
        ),
        (
            'directory = "crl"',
            f'directory = "crl"\ndelta_distribution_points = ["{_H}/crl/%2E/k-delta.crl"]',
            f"crl.delta_distribution_points: '{_H}/crl/%2E/k-delta.crl' cannot be served over HTTP: the path has a dot-segment",
        ),
    ],
)
def test_invalid_settings_are_refused_by_name(tmp_path: Path, old: str, new: str, message: str) -> None:
    """A CRL or CA URL whose path the HTTP server answers 400 (it decodes paths since 609355d) was accepted and unreachable."""
    with pytest.raises(ConfigError) as excinfo:
        config.load(_write(tmp_path, _dev(tmp_path, **{old: new})))
    assert message in excinfo.value.message


# Each device key type alone in the development profile: the other two taken out.
_ONLY_KEY_TYPE = {
    "EC": {"rsa_max_bits = 8192": "rsa_max_bits = 0", "ed25519 = true": "ed25519 = false"},
    "RSA": {'ec_curves = ["P-256", "P-384"]': "ec_curves = []", "ed25519 = true": "ed25519 = false"},
    "Ed25519": {'ec_curves = ["P-256", "P-384"]': "ec_curves = []", "rsa_max_bits = 8192": "rsa_max_bits = 0"},
}
_DEVICE_KEYS: dict[str, Callable[[], ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey]] = {
    "EC": lambda: ec.generate_private_key(ec.SECP256R1()),
    "RSA": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
    "Ed25519": ed25519.Ed25519PrivateKey.generate,
}


def _lint_errors_of_leaf(key_type: str, key_usage: tuple[str, ...]) -> list[str]:
    """pkilint's ERROR and FATAL codes on the certificate the issuer builds for a device key of key_type with key_usage."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Key Usage Test CA")])
    root = issuer.build_root(ca_name, ca_key.public_key(), datetime.now(UTC), timedelta(days=30)).sign(ca_key, hashes.SHA256())
    device_key = _DEVICE_KEYS[key_type]()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sensor-0001")]))
        .sign(device_key, issuer.signature_hash(device_key))
    )
    profile = policy.build_profile(config.ProfileConfig(name="device", key_usage=key_usage))
    decision = policy.decide(policy.parse_csr(csr.public_bytes(serialization.Encoding.DER), 65536), profile)
    builder = issuer.build_leaf(decision, root, issuer.new_serial(), datetime.now(UTC), timedelta(minutes=1), issuer.LeafUrls())
    leaf = builder.sign(ca_key, hashes.SHA256())
    return [f.code for f in pkilint_findings(leaf.public_bytes(serialization.Encoding.DER)) if f.severity in ("ERROR", "FATAL")]


@pytest.mark.parametrize("usage", config.LEAF_KEY_USAGES)
@pytest.mark.parametrize("key_type", sorted(_ONLY_KEY_TYPE))
def test_a_profile_is_refused_for_a_key_usage_exactly_where_pkilint_flags_its_certificates(
    tmp_path: Path, key_type: str, usage: str
) -> None:
    """A profile's key_usage goes into the certificate of every key type it allows. One with keyAgreement and RSA keys,
    or keyEncipherment or dataEncipherment and EC or Ed25519 keys, loaded: with the lint on, every Sign for such a key
    was refused (the template lint certifies one key type only), with it off the certificate was issued against
    RFC 5480, RFC 8410 or RFC 3279. The configuration is refused where pkilint flags the certificate, and only there."""
    key_usage = tuple(dict.fromkeys(("digitalSignature", usage)))
    flagged = _lint_errors_of_leaf(key_type, key_usage)
    listed = ", ".join(f'"{u}"' for u in key_usage)
    text = _dev(tmp_path, **_ONLY_KEY_TYPE[key_type], **{'key_usage = ["digitalSignature"]': f"key_usage = [{listed}]"})
    if not flagged:
        assert config.load(_write(tmp_path, text)).profile("device").key_usage == key_usage
        return
    lint_name = {"RSA": "rsa", "EC": "ec", "Ed25519": "edwards_curve"}[key_type]
    assert flagged == [f"pkix.key_usage_value_prohibited_for_{lint_name}"]
    with pytest.raises(ConfigError) as excinfo:
        config.load(_write(tmp_path, text))
    message = excinfo.value.message
    assert message.startswith(f"profiles.device.key_usage: {usage} is prohibited for {key_type} keys ("), message
    assert f"every key type the profile allows: remove {usage} from key_usage" in message, message


def test_a_key_usage_some_of_the_profiles_key_types_cannot_have_names_them_and_how_to_split_the_profile(tmp_path: Path) -> None:
    """The development profile allows EC, RSA and Ed25519 keys; keyEncipherment suits the RSA keys only."""
    text = _dev(tmp_path, **{'key_usage = ["digitalSignature"]': 'key_usage = ["digitalSignature", "keyEncipherment"]'})
    with pytest.raises(ConfigError) as excinfo:
        config.load(_write(tmp_path, text))
    assert excinfo.value.message == (
        "profiles.device.key_usage: keyEncipherment is prohibited for EC and Ed25519 keys (EC: RFC 5480, Ed25519: RFC 8410), "
        'and the profile allows them (ec_curves = ["P-256", "P-384"]; ed25519 = true): a certificate for such a key would '
        "carry a key usage its key cannot have, refused by the pre-issuance lint at every Sign, or issued broken with "
        '[lint] mode = "off". Each usage of key_usage goes into the certificates of every key type the profile allows: '
        "remove keyEncipherment from key_usage, or split the profile by key type: one profile for RSA keys with "
        "keyEncipherment (ec_curves = [], ed25519 = false), another for EC and Ed25519 keys without it (rsa_max_bits = 0)"
    )
    # Split so, each profile loads.
    split = text.replace("ed25519 = true", "ed25519 = false").replace('ec_curves = ["P-256", "P-384"]', "ec_curves = []")
    split += "\n[profiles.device-ec-ed25519]\nrsa_max_bits = 0\n"
    loaded = config.load(_write(tmp_path, split))
    assert loaded.profile("device").key_usage == ("digitalSignature", "keyEncipherment")
    assert loaded.profile("device-ec-ed25519").key_usage == ("digitalSignature",)


def test_the_ca_link_profile_name_is_reserved(tmp_path: Path) -> None:
    """Link certificates are stored under the profile "ca-link": a device profile of that name made its devices'
    certificates count as links (only officers could revoke them, and a key's retirement did not count them)."""
    text = _dev(tmp_path) + '\n[profiles.ca-link]\ndevice_id_pattern = "^[a-z0-9-]{1,64}$"\n'
    with pytest.raises(ConfigError) as excinfo:
        config.load(_write(tmp_path, text))
    assert excinfo.value.message == (
        "[profiles.ca-link]: the profile name 'ca-link' is reserved for the CA link certificates a root roll-over makes; "
        "give the profile another name"
    )
    assert "ca-link-devices" in config.load(_write(tmp_path, text.replace("[profiles.ca-link]", "[profiles.ca-link-devices]"))).profiles


def test_a_validity_in_seconds_past_three_years_sets_the_default_maximum(tmp_path: Path) -> None:
    """validity_seconds of 3 years and a part of a day was refused ("validity_days exceeds max_validity_days", neither
    set): the default maximum counted the validity's whole days only."""
    cfg = config.load(_write(tmp_path, _dev(tmp_path, **{"validity_days = 365": "validity_seconds = 100000000"})))
    profile = cfg.profiles["device"]
    assert profile.validity == timedelta(seconds=100_000_000) and profile.max_validity == timedelta(days=1158)


def test_crl_and_ca_urls_the_server_serves_are_accepted(tmp_path: Path) -> None:
    """Percent-escapes the server decodes, a query it ignores, and a URL with no path (served at /) all load."""
    urls = ("http://127.0.0.1:8080/crl/k%2Dx.crl?v=1", "https://crl.example.net", "http://[::1]:8080/crl/k%20x.crl")
    cdp = 'crl_distribution_points = ["http://127.0.0.1:8080/crl/k.crl"]'
    cfg = config.load(_write(tmp_path, _dev(tmp_path, **{cdp: "crl_distribution_points = [" + ", ".join(f'"{u}"' for u in urls) + "]"})))
    assert cfg.ca.crl_distribution_points == urls


@pytest.mark.parametrize(
    ("listen", "message"),
    [
        ("[::1]:50051", ""),
        ("127.0.0.2:50051", ""),
        ("localhost:50051", ""),  # resolved: 127.0.0.1 here (see test_check_config for a localhost that is not only loopback)
        (":50051", "server.listen = ':50051' binds every interface"),
        ("192.0.2.7:50051", "server.listen = '192.0.2.7:50051' is not a loopback address"),
        ("no-such-host.invalid:50051", "server.listen = 'no-such-host.invalid:50051' names a host that does not resolve"),
    ],
)
def test_development_mode_binds_only_what_resolves_to_loopback(tmp_path: Path, listen: str, message: str) -> None:
    text = _dev(tmp_path, **{'listen = "127.0.0.1:50051"': f'listen = "{listen}"'})
    if not message:
        assert config.load(_write(tmp_path, text)).server.listen == listen
        return
    with pytest.raises(ConfigError) as excinfo:
        config.load(_write(tmp_path, text))
    assert message in excinfo.value.message


def test_not_toml_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(_write(tmp_path, "[server\n"))


def test_pin_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    pin = tmp_path / "pin"
    pin.write_text("1234\n")
    pin.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        config.SecretSource(file=pin).read()
    pin.chmod(0o600)
    assert config.SecretSource(file=pin).read() == "1234"


def test_pin_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CA_TEST_PIN", "9876")
    assert config.SecretSource(env="CA_TEST_PIN").read() == "9876"
    monkeypatch.delenv("CA_TEST_PIN")
    with pytest.raises(ConfigError, match="CA_TEST_PIN"):
        config.SecretSource(env="CA_TEST_PIN").read()


def test_workers_keep_to_one_cpu_each_only_when_every_cpu_has_a_worker() -> None:
    from ca_daemon.app import worker_cpus

    assert worker_cpus("auto", 2, {0, 1}) == [0, 1]
    assert worker_cpus("auto", 3, {2, 5}) == [2, 5, 2]  # round robin over the CPUs the daemon may use
    assert worker_cpus("auto", 2, {0, 1, 2, 3}) == [None, None]  # idle CPUs stay usable by every worker's threads
    assert worker_cpus("auto", 4, {7}) == [None] * 4
    assert worker_cpus("off", 2, {0, 1}) == [None, None]


@pytest.mark.parametrize(
    ("old", "new", "unknown", "known"),
    [
        # A whole table at top level, and a top-level key.
        ("[metrics]", "[metricz]", "table [metricz]", "[metrics]"),
        ('default_profile = "device"', 'default_profile = "device"\ndefault_profil = "x"', "setting `default_profil`", "`default_profile`"),
        # A key in a section.
        ("workers = 2", "workerz = 3", "setting `server.workerz`", "`server.workers`"),
        ('mode = "template"', 'modee = "x"', "setting `lint.modee`", "`lint.mode`"),
        # A key in a profile, in a caller, and a table nested in a profile.
        ("validity_days = 365", "validity_dayz = 30", "setting `profiles.device.validity_dayz`", "`profiles.device.validity_days`"),
        ('profiles = ["device"]', 'profile = ["d"]', "setting `callers.local-developer.profile`", "`callers.local-developer.profiles`"),
        ("device.san_allowed]", "device.san_alowed]", "table [profiles.device.san_alowed]", "[profiles.device.san_allowed]"),
    ],
)
def test_a_misspelled_setting_is_refused_with_a_suggestion(tmp_path: Path, old: str, new: str, unknown: str, known: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        config.load(_write(tmp_path, _dev(tmp_path, **{old: new})))
    assert excinfo.value.message == f"unknown {unknown}; did you mean {known}?"


@pytest.mark.parametrize(
    ("old", "new", "unknown"),
    [
        ("[rotation]", "[colours]\nsky = 1\n\n[rotation]", "table [colours]"),
        ("workers = 2", 'workers = 2\ncolour = "blue"', "setting `server.colour`"),
        ("allow_reissue = false", "allow_reissue = false\nflavour = 1", "setting `profiles.device.flavour`"),
    ],
)
def test_an_unknown_setting_without_a_close_name_is_refused(tmp_path: Path, old: str, new: str, unknown: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        config.load(_write(tmp_path, _dev(tmp_path, **{old: new})))
    assert excinfo.value.message == f'unknown {unknown}; see README.md, "Configuration"'


@pytest.mark.parametrize("directory", ["ca.db", "ca.db/crl"])
def test_a_crl_directory_that_is_a_file_or_under_one_is_refused(tmp_path: Path, directory: str) -> None:
    """The CRL worker stopped with a FileExistsError traceback, restarted for ever, while check-config said ok."""
    (tmp_path / "ca.db").write_bytes(b"")
    with pytest.raises(ConfigError) as excinfo:
        config.load(_write(tmp_path, _dev(tmp_path, **{'directory = "crl"': f'directory = "{directory}"'})))
    assert excinfo.value.message == (
        f"crl.directory = '{tmp_path / directory}': {tmp_path / 'ca.db'} is not a directory; name a directory for the CRL files"
    )
    missing = config.load(_write(tmp_path, _dev(tmp_path, **{'directory = "crl"': 'directory = "new/crl"'})))
    assert missing.crl.directory == tmp_path / "new" / "crl"  # made at start


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (
            'key = "pkcs11:token=t;object=audit-1"',
            'key = "pkcs11:token=t;object=k"',
            "audit.key names the same key as ca.key (object=k in token 't')",
        ),
        ('key = "pkcs11:token=t;object=k"', 'key = "pkcs11:token=t;object=audit-1"', "audit.key names the same key as ca.key"),
        ("[metrics]", '[tls]\nca_key = "pkcs11:token=t;object=%6b"\n\n[metrics]', "tls.ca_key names the same key as ca.key (object=k"),
        ("[metrics]", '[tls]\nca_key = "pkcs11:token=t;object=audit-1"\n\n[metrics]', "tls.ca_key names the same key as audit.key"),
    ],
)
def test_the_ca_audit_and_mtls_ca_keys_must_be_different_keys(tmp_path: Path, old: str, new: str, message: str) -> None:
    """An audit.key naming the CA key made init generate the audit key under the CA key's label, then refuse to make the CA key."""
    with pytest.raises(ConfigError) as excinfo:
        config.load(_write(tmp_path, _dev(tmp_path, **{old: new})))
    assert message in excinfo.value.message and "each needs a key of its own" in excinfo.value.message
    another_label = _dev(tmp_path, **{"[metrics]": '[tls]\nca_key = "pkcs11:token=t;object=k2"\n\n[metrics]'})
    assert config.load(_write(tmp_path, another_label)).tls.ca_key_uri == "pkcs11:token=t;object=k2"


_OTHER_AUDIT_TOKEN = {'key = "pkcs11:token=t;object=audit-1"': 'key = "pkcs11:token=other;object=audit-1"'}


@pytest.mark.parametrize(
    ("edits", "message"),
    [
        ({'token = "t"': 'token = "other"'}, "ca.key = 'pkcs11:token=t;object=k' names token 't', but hsm.token = 'other'"),
        (_OTHER_AUDIT_TOKEN, "audit.key = 'pkcs11:token=other;object=audit-1' names token 'other', but hsm.token = 't'"),
        (
            {"[metrics]": '[tls]\nca_key = "pkcs11:token=other;object=mtls-ca-1"\n\n[metrics]'},
            "tls.ca_key = 'pkcs11:token=other;object=mtls-ca-1' names token 'other', but hsm.token = 't'",
        ),
        (  # hsm.token unset: it is ca.key's token, which audit.key contradicts
            {'token = "t"\n': "", **_OTHER_AUDIT_TOKEN},
            "audit.key = 'pkcs11:token=other;object=audit-1' names token 'other', but hsm.token = 't' (unset: the token of ca.key)",
        ),
    ],
)
def test_a_key_in_another_token_than_hsm_token_is_refused(tmp_path: Path, edits: dict[str, str], message: str) -> None:
    """The daemon opens hsm.token alone: start-up said "token ... not found", or used a key of that label in hsm.token."""
    with pytest.raises(ConfigError) as excinfo:
        config.load(_write(tmp_path, _dev(tmp_path, **edits)))
    assert excinfo.value.message.startswith(message), excinfo.value.message
    assert "name the same token in both" in excinfo.value.message


@pytest.mark.parametrize(
    ("edits", "setting", "uri"),
    [
        ({'key = "pkcs11:token=t;object=k"': 'key = "pkcs11:token=t"'}, "ca.key", "pkcs11:token=t"),
        ({'key = "pkcs11:token=t;object=audit-1"': 'key = "pkcs11:token=t;object="'}, "audit.key", "pkcs11:token=t;object="),
        ({"[metrics]": '[tls]\nca_key = "pkcs11:token=t;objekt=x"\n\n[metrics]'}, "tls.ca_key", "pkcs11:token=t;objekt=x"),
    ],
)
def test_a_key_uri_that_names_no_key_is_refused_by_its_setting(tmp_path: Path, edits: dict[str, str], setting: str, uri: str) -> None:
    """It loaded; at start hsm.Pkcs11Uri refused it without naming the setting, and for audit.key serve said the key
    "is not in the token; run `ca-daemon init`"."""
    with pytest.raises(ConfigError) as excinfo:
        config.load(_write(tmp_path, _dev(tmp_path, **edits)))
    assert excinfo.value.message.startswith(f"{setting} = {uri!r} names no key: add object=LABEL or id=%01%02..."), excinfo.value.message


def test_a_key_uri_without_a_token_is_the_key_in_hsm_token(tmp_path: Path) -> None:
    """RFC 7512: no token= matches any token, and the daemon opens one. Such URIs loaded, then every reader of them
    (hsm.Pkcs11Uri) refused them at start: serve said the audit key "is not in the token; run `ca-daemon init`"."""
    text = _dev(
        tmp_path,
        **{
            'key = "pkcs11:token=t;object=k"': 'key = "pkcs11:object=k"',
            'key = "pkcs11:token=t;object=audit-1"': 'key = "pkcs11:id=%01"',
            "[metrics]": '[tls]\nca_key = "pkcs11:object=my%20ca"\n\n[metrics]',
        },
    )
    cfg = config.load(_write(tmp_path, text))
    assert (cfg.hsm.token, cfg.ca.key_uri, cfg.audit.key_uri, cfg.tls.ca_key_uri) == (
        "t",
        "pkcs11:token=t;object=k",
        "pkcs11:token=t;id=%01",
        "pkcs11:token=t;object=my%20ca",
    )
    with pytest.raises(ConfigError) as excinfo:  # nothing says which token: still refused
        config.load(_write(tmp_path, text.replace('token = "t"\n', "")))
    assert excinfo.value.message == "ca.key 'pkcs11:object=k' must name its token (token=...), or set hsm.token"
    spaced = _dev(tmp_path, **{'token = "t"': 'token = "my ca"', "pkcs11:token=t;": "pkcs11:token=my%20ca;"})
    assert config.load(_write(tmp_path, spaced)).hsm.token == "my ca"  # the URI's token is percent-decoded


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (
            'http_listen = "127.0.0.1:8080"',
            'http_listen = "127.0.0.1:50051"',
            "server.http_listen = '127.0.0.1:50051' takes the port of server.listen = '127.0.0.1:50051'",
        ),
        (
            '[metrics]\nlisten = ""',
            '[metrics]\nlisten = "127.0.0.1:8080"',
            "metrics.listen = '127.0.0.1:8080' takes the port of server.http_listen",
        ),
        ('[metrics]\nlisten = ""', '[metrics]\nlisten = "[::1]:50051"', ""),  # another address, the same port: no clash
        ('http_listen = "127.0.0.1:8080"', 'http_listen = ":50051"', "server.http_listen = ':50051' takes the port of server.listen"),
        # What binds is compared, not the text: a name resolves, an address in any spelling, a port with a leading zero.
        (
            'http_listen = "127.0.0.1:8080"',
            'http_listen = "localhost:50051"',
            "server.http_listen = 'localhost:50051' takes the port of server.listen = '127.0.0.1:50051' (both bind 127.0.0.1)",
        ),
        (
            'http_listen = "127.0.0.1:8080"',
            'http_listen = "[0:0:0:0:0:0:0:0]:50051"',
            "server.http_listen = '[0:0:0:0:0:0:0:0]:50051' takes the port of server.listen = '127.0.0.1:50051' "
            "(0:0:0:0:0:0:0:0 binds every address)",
        ),
        (
            'http_listen = "127.0.0.1:8080"',
            'http_listen = "[::]:50051"',
            "server.http_listen = '[::]:50051' takes the port of server.listen",
        ),
        (
            '[metrics]\nlisten = ""',
            '[metrics]\nlisten = "127.0.0.1:08080"',
            "metrics.listen = '127.0.0.1:08080' takes the port of server.http_listen = '127.0.0.1:8080' (both bind 127.0.0.1)",
        ),
        (
            'http_listen = "127.0.0.1:8080"',
            'http_listen = "[::ffff:127.0.0.1]:50051"',
            "server.http_listen = '[::ffff:127.0.0.1]:50051' takes the port of server.listen = '127.0.0.1:50051' (both bind 127.0.0.1)",
        ),
        ('http_listen = "127.0.0.1:8080"', 'http_listen = "127.0.0.2:50051"', ""),  # another loopback address
        ('http_listen = "127.0.0.1:8080"', 'http_listen = "no-such-host.invalid:50051"', ""),  # left to the bind at start
    ],
)
def test_the_grpc_crl_and_metrics_listeners_each_need_their_own_port(tmp_path: Path, old: str, new: str, message: str) -> None:
    """gRPC binds with SO_REUSEPORT: an http_listen equal to server.listen had the CRL server retry its bind for ever,
    or both listen, each connection going to either."""
    path = _write(tmp_path, _dev(tmp_path, **{old: new}))
    if not message:
        config.load(path)
        return
    with pytest.raises(ConfigError) as excinfo:
        config.load(path)
    assert excinfo.value.message.startswith(message) and "give each listener a port of its own" in excinfo.value.message


@pytest.mark.parametrize(
    ("listen", "other", "message"),
    [
        # On Linux an IPv6 wildcard is dual-stack: it takes the port on every IPv4 address too.
        (
            "[::]:50051",
            'http_listen = "0.0.0.0:50051"',
            "server.http_listen = '0.0.0.0:50051' takes the port of server.listen = '[::]:50051'",
        ),
        ("[::]:50051", 'http_listen = "192.0.2.7:50051"', "server.http_listen = '192.0.2.7:50051' takes the port of server.listen"),
        ("0.0.0.0:50051", '[metrics]\nlisten = "localhost:50051"', "metrics.listen = 'localhost:50051' takes the port of server.listen"),
        (
            "[::1]:50051",
            '[metrics]\nlisten = "[0::1]:50051"',
            "metrics.listen = '[0::1]:50051' takes the port of server.listen = '[::1]:50051' (both bind ::1)",
        ),
        ("192.0.2.7:50051", 'http_listen = "192.0.2.8:50051"', ""),
        # An IPv4-mapped IPv6 address binds the IPv4 address it maps (the text differs).
        (
            "192.0.2.7:50051",
            'http_listen = "[::ffff:192.0.2.7]:50051"',
            "server.http_listen = '[::ffff:192.0.2.7]:50051' takes the port of server.listen = '192.0.2.7:50051' (both bind 192.0.2.7)",
        ),
        (
            "[::ffff:0.0.0.0]:50051",
            '[metrics]\nlisten = "192.0.2.8:50051"',
            "metrics.listen = '192.0.2.8:50051' takes the port of server.listen = '[::ffff:0.0.0.0]:50051'",
        ),
        ("[::ffff:192.0.2.7]:50051", 'http_listen = "[::ffff:192.0.2.8]:50051"', ""),
    ],
)
def test_with_mtls_a_wildcard_or_the_same_address_in_another_spelling_takes_the_port(
    tmp_path: Path, listen: str, other: str, message: str
) -> None:
    """With [tls] gRPC may bind any address, so the wildcards and names that development mode refuses meet here."""
    tls = '[tls]\ncert = "c.pem"\nkey = "k.pem"\nclient_ca = "ca.pem"\nclient_crl = "crl.pem"\n\n'
    edits = {"dev_mode = true": "dev_mode = false", 'listen = "127.0.0.1:50051"': f'listen = "{listen}"', "[lint]": tls + "[lint]"}
    if other.startswith("http_listen"):
        edits['http_listen = "127.0.0.1:8080"'] = other
    else:
        edits['[metrics]\nlisten = ""'] = other
    path = _write(tmp_path, _dev(tmp_path, **edits))
    if not message:
        config.load(path)
        return
    with pytest.raises(ConfigError) as excinfo:
        config.load(path)
    assert excinfo.value.message.startswith(message), excinfo.value.message
    assert "give each listener a port of its own" in excinfo.value.message


@pytest.mark.parametrize("setting", ["ca_issuers_urls", "crl_distribution_points"])
def test_a_url_with_a_trailing_newline_is_refused_by_its_own_name(tmp_path: Path, setting: str) -> None:
    """'$' let "http://...der\\n" through: check-config said ok and every worker refused to start, blaming the profile's lint
    (an AIA URL), or the message named crl.delta_distribution_points, derived from it (a CDP URL)."""
    text = _dev(tmp_path)
    start = text.index(f"{setting} = [") + len(f"{setting} = [")
    url = text[start + 1 : text.index('"', start + 1)]
    with pytest.raises(ConfigError) as excinfo:
        config.load(_write(tmp_path, text.replace(f'"{url}"', f'"{url}\\n"', 1)))
    assert excinfo.value.message == f"ca: {url + chr(10)!r} is not an http:// or https:// URL"


@pytest.mark.parametrize("value", ["123456", "12-34-56", "my pin"])
def test_a_pin_in_place_of_pin_env_is_refused_without_echoing_it(tmp_path: Path, value: str) -> None:
    """An operator who typed the PIN into pin_env read it back in 'environment variable 123456 (the PIN source) is not set'."""
    with pytest.raises(ConfigError) as excinfo:
        config.load(_write(tmp_path, _dev(tmp_path, **{'pin_file = "pins/user.pin"': f'pin_env = "{value}"'})))
    assert "hsm.pin_env must be the name of an environment variable" in excinfo.value.message
    assert value not in excinfo.value.message
    assert config.load(_write(tmp_path, _dev(tmp_path, **{'pin_file = "pins/user.pin"': 'pin_env = "CA_DAEMON_PIN_2"'}))).hsm.pin.env


@pytest.mark.parametrize("token", ["a%b", "a;b", "a?b", "50% off; ok?", "my ca"])
def test_the_default_audit_and_mtls_ca_key_uris_percent_encode_the_token(tmp_path: Path, token: str) -> None:
    """The defaults were pkcs11:token={token};object=audit-1 with the raw label: a ';' or '?' in it cut the token
    short (hsm.token was then 'another token' and the configuration refused), a '%' was decoded as an escape."""
    from ca_daemon.hsm import Pkcs11Uri

    escaped = token.replace('"', '\\"')
    text = _dev(tmp_path, **{'token = "t"': f'token = "{escaped}"', 'key = "pkcs11:token=t;object=k"': 'key = "pkcs11:object=k"'})
    cfg = config.load(_write(tmp_path, text.replace('key = "pkcs11:token=t;object=audit-1"\n', "")))
    for uri, label in ((cfg.ca.key_uri, "k"), (cfg.audit.key_uri, "audit-1"), (cfg.tls.ca_key_uri, "mtls-ca-1")):
        parsed = Pkcs11Uri.parse(uri)
        assert (parsed.token, parsed.label) == (token, label), uri
        assert uri == str(parsed)  # the encoding hsm.Pkcs11Uri writes (RFC 7512)
