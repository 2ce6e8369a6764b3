"""Set-up as a security officer and a new user meet it: init, intermediates, start-up failures, the CLI client."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import urllib.request
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ca_daemon._proto.ca_daemon.v1 import ca_pb2, ca_pb2_grpc
from ca_daemon.simulate import make_csr
from ca_daemon.verify import CrlCache, DeviceVerifier, sign_challenge
from tests.conftest import CA_DAEMON, CaEnv, CrlServer, Daemon, device_csr, make_env, openssl_verify
from tests.e2e.test_rotation import pkcs11_labels
from tests.integration.crl_helpers import crl_env


def test_init_dev_creates_everything_once_and_reuses_it(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
    config = tmp_path / "state" / "ca-daemon.toml"
    first = subprocess.run([CA_DAEMON, "--config", str(config), "init", "--dev"], capture_output=True, text=True, env=env, check=False)
    assert first.returncode == 0, first.stderr
    assert "generated ec-p256 CA key" in first.stdout and "self-signed root CA" in first.stdout
    state = tmp_path / "state"
    for pin in ("user.pin", "so.pin"):
        assert (state / "pins" / pin).stat().st_mode & 0o777 == 0o600
        assert (state / "pins" / pin).read_text().strip() not in first.stdout + first.stderr
    assert (state / "ca.db").exists() and any((state / "tokens").iterdir())
    second = subprocess.run([CA_DAEMON, "--config", str(config), "init", "--dev"], capture_output=True, text=True, env=env, check=False)
    assert second.returncode == 0, second.stderr
    assert "already has a certificate; nothing to do" in second.stdout
    assert "ignored" not in second.stderr
    # Options that only shape a new CA key are said to be ignored, not dropped without a word.
    third = subprocess.run(
        [CA_DAEMON, "--config", str(config), "init", "--key-type", "rsa-2048", "--subject", "CN=X", "--validity-days", "10"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert third.returncode == 0 and "nothing to do" in third.stdout, third.stdout + third.stderr
    assert "ignored --key-type, --subject, --validity-days: they apply only when init creates the CA key" in third.stderr, third.stderr


def test_init_refuses_a_bad_subject_or_validity_before_it_makes_anything(tmp_path: Path, softhsm_conf: Path) -> None:
    """A refused init leaves no key in the token or the store: the next good init makes both keys itself."""
    env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
    config = tmp_path / "state" / "ca-daemon.toml"
    for option, value, message in (
        ("--subject", "garbage", "not an RFC 4514 distinguished name: 'garbage'"),
        ("--validity-days", "0", "argument --validity-days: 0 is out of range: give 1 to 36500 days"),
        ("--validity-days", "99999999999", "argument --validity-days: 99999999999 is out of range"),
    ):
        refused = subprocess.run(
            [CA_DAEMON, "--config", str(config), "init", "--dev", option, value], capture_output=True, text=True, env=env, check=False
        )
        assert refused.returncode != 0 and message in refused.stderr, refused.stdout + refused.stderr
        assert "Traceback" not in refused.stderr and "generated" not in refused.stdout, refused.stdout + refused.stderr
        assert not (tmp_path / "state").exists()  # not even --dev's token and files
    ca = make_env(tmp_path, softhsm_conf, init=False)
    for option, value in (("--subject", "garbage"), ("--subject", "O=No CN"), ("--validity-days", "-5")):
        assert ca.cli("init", option, value, check=False).returncode != 0
    assert ca.cli("key", "list").stdout == ""
    made = ca.cli("init").stdout
    assert "generated the audit checkpoint key" in made and "generated ec-p256 CA key" in made, made


# Over RFC 5280's upper bounds (ub-organization-name 64, ub-locality-name 128; SIZE (1..ub): never empty), and a name
# whose every attribute is short but which encodes to over 1 KiB: every certificate the CA signs carries it.
OVERSIZED_CA_SUBJECTS = (
    ("CN=Factory CA,O=" + "o" * 65, "the CA subject's O is 65 characters long: RFC 5280 allows at most 64 (ub-organization-name)"),
    ("CN=Factory CA,L=" + "l" * 129, "the CA subject's L is 129 characters long: RFC 5280 allows at most 128 (ub-locality-name)"),
    ("CN=Factory CA,O=", "the CA subject's O is empty"),
    ("CN=Factory CA," + ",".join(["DC=" + "d" * 60] * 16), "the CA subject encodes to 1"),
    # cryptography refuses these two while parsing ("Attribute's length must be ..."), naming neither attribute nor bound.
    ("CN=" + "c" * 65, "the CA subject's CN is 65 characters long: RFC 5280 allows at most 64 (ub-common-name)"),
    ("CN=Factory CA,C=USA", "the CA subject's C is 3 characters long: RFC 5280 allows at most 2 (ub-country-name-alpha-length)"),
)


def test_init_and_ca_csr_refuse_a_ca_subject_beyond_rfc_5280_bounds_before_making_anything(tmp_path: Path, softhsm_conf: Path) -> None:
    """They took any size: the CA key was made and self-signed or its CSR written, and every leaf then carried that name."""
    ca = make_env(tmp_path, softhsm_conf, init=False)
    csr_path = tmp_path / "ca.csr"
    for subject, message in OVERSIZED_CA_SUBJECTS:
        for command in (("init", "--subject", subject), ("init", "--csr-out", str(csr_path), "--subject", subject)):
            refused = ca.cli(*command, check=False)
            assert refused.returncode == 1 and f"ca-daemon: {message}" in refused.stderr, refused.stdout + refused.stderr
            assert "Traceback" not in refused.stderr and "generated" not in refused.stdout, refused.stdout + refused.stderr
    assert ca.cli("key", "list").stdout == "" and not csr_path.exists()
    # At the bounds it is taken (a CN of 64, an O of 64, an L of 128 characters).
    at_bounds = "CN=" + "c" * 64 + ",O=" + "o" * 64 + ",L=" + "l" * 128
    made = ca.cli("init", "--subject", at_bounds).stdout
    assert "generated the audit checkpoint key" in made and "generated ec-p256 CA key" in made, made
    # `ca csr` for a key in the token refuses them too, and writes nothing.
    for subject, message in OVERSIZED_CA_SUBJECTS:
        refused = ca.cli("ca", "csr", "--label", "ca-root-1", "--subject", subject, "--out", str(csr_path), check=False)
        assert refused.returncode == 1 and f"ca-daemon: {message}" in refused.stderr, refused.stdout + refused.stderr
    assert not csr_path.exists()


def test_init_csr_out_for_a_key_that_has_its_certificate_fails_and_says_what_writes_a_csr(tmp_path: Path, softhsm_conf: Path) -> None:
    """README (Keys in the HSM): `init --csr-out` once the CA key has a certificate (e.g. after `make run`)."""
    env = make_env(tmp_path, softhsm_conf)
    csr_path = tmp_path / "ca.csr"
    result = env.cli("init", "--csr-out", str(csr_path), "--subject", "CN=Factory Issuing CA 1,O=Example", check=False)
    assert result.returncode == 1, result.stdout
    assert f"already has a certificate, so init wrote no CSR to {csr_path}" in result.stderr, result.stderr
    assert "ca-daemon ca csr --label" in result.stderr and not csr_path.exists()
    assert "nothing to do" in env.cli("init").stdout  # without --csr-out, a rerun is still fine
    # What the message and README say to do instead: `ca csr` for the key, then import the parent's answer.
    env.cli("ca", "csr", "--label", "ca-root-1", "--subject", "CN=Factory Issuing CA 1,O=Example", "--out", str(csr_path))
    parent = _ParentCa()
    cert_path, root_path = tmp_path / "intermediate.pem", tmp_path / "root.pem"
    cert_path.write_bytes(parent.certify(csr_path.read_bytes()).public_bytes(serialization.Encoding.PEM))
    root_path.write_bytes(parent.cert.public_bytes(serialization.Encoding.PEM))
    env.cli("ca", "import-cert", "--label", "ca-root-1", "--cert", str(cert_path), "--chain", str(root_path))
    env.cli("ca", "export", "--out", str(tmp_path / "chain.pem"))
    chain = x509.load_pem_x509_certificates((tmp_path / "chain.pem").read_bytes())
    assert [c.subject.rfc4514_string() for c in chain] == ["CN=Factory Issuing CA 1,O=Example", parent.cert.subject.rfc4514_string()]


def test_wrong_pin_stops_the_daemon_with_one_line(tmp_path: Path, softhsm_conf: Path) -> None:
    env = make_env(tmp_path, softhsm_conf)
    pin = env.state_dir / "pins" / "user.pin"
    real = pin.read_text()
    pin.write_text("0000-wrong\n")
    result = env.cli("serve", check=False)
    pin.write_text(real)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == f"ca-daemon: wrong PIN for PKCS#11 token {env.token!r}"
    assert "0000-wrong" not in result.stderr


def test_missing_token_stops_the_daemon_with_one_line(tmp_path: Path, softhsm_conf: Path) -> None:
    env = make_env(tmp_path, softhsm_conf)
    env.edit_config(f'token = "{env.token}"', 'token = "no-such-token"')
    env.edit_config(f"pkcs11:token={env.token};", "pkcs11:token=no-such-token;")  # ca.key, audit.key: else refused at load
    result = env.cli("serve", check=False)
    assert result.returncode != 0
    assert "token 'no-such-token' not found" in result.stderr.strip().splitlines()[-1]


def test_key_without_certificate_stops_the_daemon_with_a_hint(tmp_path: Path, softhsm_conf: Path) -> None:
    env = make_env(tmp_path, softhsm_conf, init=False)
    env.cli("key", "generate", "--type", "ec-p256", "--label", "ca-root-1")
    result = env.cli("serve", check=False)
    assert result.returncode != 0
    assert "has no certificate installed" in result.stderr


def test_key_generate_refuses_a_label_that_would_make_a_wrong_crl_url(tmp_path: Path, softhsm_conf: Path) -> None:
    """Another key's CRL URLs are the configured ones with its label in place of the configured key's: ".." made the
    dot-segment of /crl/../x.crl, and key ca-root-1-delta's full CRL went where ca-root-1's delta CRL is served."""
    env = make_env(tmp_path, softhsm_conf)
    for label in (".", "..", "ca-root-1-delta"):
        result = env.cli("key", "generate", "--label", label, check=False)
        assert result.returncode == 1
        assert result.stderr.strip() == (
            f"ca-daemon: key label {label!r} is not usable: use 1-64 of [A-Za-z0-9-_.], starting with a letter or digit, "
            "not ending in -delta"
        )
    assert [line.split("\t")[0] for line in env.cli("key", "list").stdout.splitlines()] == ["ca-root-1"]


_DEV_CRL, _DEV_DER = "http://127.0.0.1:8080/crl/ca-root-1.crl", "http://127.0.0.1:8080/ca/ca-root-1.der"


def test_key_generate_refuses_urls_that_would_not_name_the_new_key(tmp_path: Path, softhsm_conf: Path) -> None:
    """Every other key's URLs are the configured ones with its label in place of the configured key's: a URL without that
    label (or with it only percent-encoded) gave the new key the same URL, so both keys' CRLs were served at one path,
    each replacing the other, and the old key's devices were sent to the new key's CRL. Refused; nothing is created."""
    env = make_env(tmp_path, softhsm_conf)
    keys, objects = env.cli("key", "list").stdout, pkcs11_labels(env)
    refused = _generate_with_urls(env, crl="http://127.0.0.1:8080/factory.crl")
    assert refused.returncode == 1
    assert refused.stderr.strip() == (
        "ca-daemon: CA key ca-root-2 would get the CRL and CA URLs of CA key ca-root-1, so it was not created: "
        "ca.crl_distribution_points URL 'http://127.0.0.1:8080/factory.crl' does not have the key's label ca-root-1 in its path: "
        "write 'http://127.0.0.1:8080/crl/ca-root-1.crl'; crl.delta_distribution_points URL "
        "'http://127.0.0.1:8080/factory-delta.crl' does not have the key's label ca-root-1 in its path: "
        "write 'http://127.0.0.1:8080/crl/ca-root-1-delta.crl'. The URLs of every other key are the configured ones with its "
        "label in place of ca-root-1's, in the path as written (not percent-encoded, not in the host or query). Certificates "
        "issued so far keep the old URLs, which the daemon goes on serving to them once it has recorded them (any start with "
        "them configured does: start it once before changing them); one that only an earlier version served, keep served in "
        "front (a copy or redirect) until they expire; then restart the daemon ([ca] and [crl] are read at start) and create "
        "the key again"
    )
    encoded = _generate_with_urls(env, crl="http://127.0.0.1:8080/crl/ca%2Droot-1.crl")
    assert encoded.returncode == 1
    assert "URL 'http://127.0.0.1:8080/crl/ca%2Droot-1.crl' has ca-root-1 only percent-encoded in its path" in encoded.stderr
    in_host = _generate_with_urls(env, der="http://ca-root-1.example.net/ca.der")
    assert in_host.returncode == 1
    assert "ca.ca_issuers_urls URL 'http://ca-root-1.example.net/ca.der' does not have the key's label" in in_host.stderr
    assert "write 'http://ca-root-1.example.net/ca/ca-root-1.der'" in in_host.stderr
    assert env.cli("key", "list").stdout == keys and pkcs11_labels(env) == objects
    # init of another [ca] key beside ca-root-1, with URLs naming ca-root-1: they would give both keys one URL.
    env.edit_config("object=ca-root-1", "object=ca-root-9")
    init = env.cli("init", check=False)
    assert init.returncode == 1
    assert init.stderr.startswith("ca-daemon: CA key ca-root-9 would get the CRL and CA URLs of CA key ca-root-1, so it was not created:")
    assert "'http://127.0.0.1:8080/crl/ca-root-1.crl' does not have the key's label ca-root-9 in its path" in init.stderr
    assert env.cli("key", "list").stdout == keys and pkcs11_labels(env) == objects
    env.edit_config("object=ca-root-9", "object=ca-root-1")
    # With the label in each path, the key is made.
    made = _generate_with_urls(env)
    assert made.returncode == 0, made.stderr
    assert "ca-root-2\tec-p256\tpending\tno certificate" in env.cli("key", "list").stdout
    assert "label:      ca-root-2" in pkcs11_labels(env)


def _generate_with_urls(env: CaEnv, *, crl: str = _DEV_CRL, der: str = _DEV_DER) -> subprocess.CompletedProcess[str]:
    """`key generate --label ca-root-2` with [ca]'s URLs set to crl and der (by default as make_env writes them)."""
    text = re.sub(r"crl_distribution_points = \[.*\]", f'crl_distribution_points = ["{crl}"]', env.config_path.read_text())
    text = re.sub(r"ca_issuers_urls = \[.*\]", f'ca_issuers_urls = ["{der}"]', text)
    env.config_path.write_text(text)
    return env.cli("key", "generate", "--label", "ca-root-2", check=False)


def test_key_generate_types_and_help(tmp_path: Path, softhsm_conf: Path) -> None:
    env = make_env(tmp_path, softhsm_conf, init=False)
    for key_type in ("ec-p384", "rsa-2048", "ed25519"):
        uri = env.cli("key", "generate", "--type", key_type, "--label", f"k-{key_type}").stdout.strip()
        assert uri.startswith(f"pkcs11:token={env.token};object=k-{key_type};id=%")
    listing = env.cli("key", "list").stdout
    assert "k-ed25519\ted25519\tpending\tno certificate" in listing
    assert "Ed25519 needs a token that offers" in env.cli("key", "generate", "--help").stdout.replace("\n", " ").replace("  ", " ")


def test_key_generate_refuses_a_label_already_taken(tmp_path: Path, softhsm_conf: Path) -> None:
    """It overwrote the store's record of the key of that label, the active CA key's too, and left two token keys of one label."""
    env = make_env(tmp_path, softhsm_conf)  # ca-root-1 has its certificate (it becomes active when the daemon first starts)
    before = env.cli("key", "list").stdout
    assert "ca-root-1\tec-p256\tpending\tcertificate installed" in before
    taken = env.cli("key", "generate", "--type", "ec-p256", "--label", "ca-root-1", check=False)
    assert taken.returncode == 1 and "a CA key named 'ca-root-1' exists already" in taken.stderr, taken.stderr
    assert env.cli("key", "list").stdout == before
    # A token key the store does not know (the audit key) is no label for a CA key either.
    audit = env.cli("key", "generate", "--type", "ec-p256", "--label", "audit-1", check=False)
    assert audit.returncode == 1 and "the token already holds a key labelled 'audit-1'" in audit.stderr, audit.stderr
    assert env.cli("key", "list").stdout == before
    assert env.cli("check-config").returncode == 0  # one key per label: the CA key is found


class _ParentCa:
    """An outside parent CA (software key, test only) that certifies our HSM key."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP384R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Outside Root CA")])
        now = datetime.now(UTC)
        ski = x509.SubjectKeyIdentifier.from_public_key(self.key.public_key())
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1))
            .not_valid_after(now + timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(ski, critical=False)
            .sign(self.key, hashes.SHA384())
        )

    def certify(self, csr_pem: bytes, crl_urls: tuple[str, ...] = (), valid_for: timedelta = timedelta(days=1825)) -> x509.Certificate:
        csr = x509.load_pem_x509_csr(csr_pem)
        assert csr.is_signature_valid
        now = datetime.now(UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(csr.subject)
            .issuer_name(self.cert.subject)
            .public_key(csr.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1))
            .not_valid_after(now + valid_for)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(csr.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
        )
        if crl_urls:
            point = x509.DistributionPoint([x509.UniformResourceIdentifier(url) for url in crl_urls], None, None, None)
            builder = builder.add_extension(x509.CRLDistributionPoints([point]), critical=False)
        return builder.sign(self.key, hashes.SHA384())

    def crl(self, number: int, revoked: tuple[int, ...] = ()) -> bytes:
        """The parent's CRL (DER), revoking the given serials for key compromise."""
        now = datetime.now(UTC)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(now - timedelta(minutes=1))
            .next_update(now + timedelta(days=1))
            .add_extension(x509.CRLNumber(number), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
        )
        for serial in revoked:
            entry = (
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(now - timedelta(seconds=30))
                .add_extension(x509.CRLReason(x509.ReasonFlags.key_compromise), critical=False)
                .build()
            )
            builder = builder.add_revoked_certificate(entry)
        return builder.sign(self.key, hashes.SHA384()).public_bytes(serialization.Encoding.DER)


def test_export_before_the_first_start_refuses_a_certificate_that_expired_since_its_import(tmp_path: Path, softhsm_conf: Path) -> None:
    """The first start would refuse it (no key becomes the signing key outside its certificate's validity), so export
    does not hand out a chain the daemon will never issue under (found in a review of the export before the first start)."""
    env = make_env(tmp_path, softhsm_conf, init=False)
    csr_path, cert_path, root_path = tmp_path / "ca.csr", tmp_path / "intermediate.pem", tmp_path / "root.pem"
    env.cli("init", "--csr-out", str(csr_path), "--subject", "CN=Short-lived Issuing CA")
    parent = _ParentCa()
    cert_path.write_bytes(parent.certify(csr_path.read_bytes()).public_bytes(serialization.Encoding.PEM))
    root_path.write_bytes(parent.cert.public_bytes(serialization.Encoding.PEM))
    env.cli("ca", "import-cert", "--label", "ca-root-1", "--cert", str(cert_path), "--chain", str(root_path))
    # The same key certified again, valid until a minute ago: as if the imported certificate had since expired
    # (import-cert refuses an expired one, and waiting for a short-lived one to expire made the test depend on timing).
    expired = parent.certify(csr_path.read_bytes(), valid_for=timedelta(minutes=-1)).public_bytes(serialization.Encoding.DER)
    with sqlite3.connect(env.state_dir / "ca.db") as database:
        database.execute("UPDATE ca_keys SET certificate_der = ? WHERE key_id = 'ca-root-1'", (expired,))
    refused = env.cli("ca", "export", "--out", str(tmp_path / "export.pem"), check=False)
    assert refused.returncode == 1 and "the certificate of CA key ca-root-1 expired at" in refused.stderr, refused.stderr
    assert not (tmp_path / "export.pem").exists()


def test_intermediate_signed_by_an_outside_parent(tmp_path: Path, softhsm_conf: Path) -> None:
    env = make_env(tmp_path, softhsm_conf, init=False)
    csr_path = tmp_path / "ca.csr"
    env.cli("init", "--csr-out", str(csr_path), "--subject", "CN=Factory Issuing CA 1,O=Example Devices")
    parent = _ParentCa()
    intermediate = parent.certify(csr_path.read_bytes())
    cert_path, root_path = tmp_path / "intermediate.pem", tmp_path / "root.pem"
    root_path.write_bytes(parent.cert.public_bytes(serialization.Encoding.PEM))

    # A certificate for another key is refused: its public key must match the HSM key.
    stranger = _ParentCa().certify(
        x509.CertificateSigningRequestBuilder()
        .subject_name(intermediate.subject)
        .sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    cert_path.write_bytes(stranger.public_bytes(serialization.Encoding.PEM))
    refused = env.cli("ca", "import-cert", "--label", "ca-root-1", "--cert", str(cert_path), "--chain", str(root_path), check=False)
    assert refused.returncode != 0 and "does not match CA key" in refused.stderr

    cert_path.write_bytes(intermediate.public_bytes(serialization.Encoding.PEM))
    env.cli("ca", "import-cert", "--label", "ca-root-1", "--cert", str(cert_path), "--chain", str(root_path))
    # Installed; the key becomes active when the daemon first starts, and its chain can be exported before that
    # (to register it with a cloud service first): export says so, and writes the chain the daemon then issues under.
    exported, early = tmp_path / "export.pem", tmp_path / "early.pem"
    before = env.cli("ca", "export", "--out", str(early))
    assert "CA key ca-root-1 becomes the signing key when the daemon first starts" in before.stderr, before.stderr
    daemon = Daemon(env, tmp_path / "daemon.log").start()
    try:
        env.cli("ca", "export", "--out", str(exported))
        assert early.read_bytes() == exported.read_bytes()
        assert [c.subject.rfc4514_string() for c in x509.load_pem_x509_certificates(exported.read_bytes())] == [
            "CN=Factory Issuing CA 1,O=Example Devices",
            "CN=Outside Root CA",
        ]
        csr_file, out = tmp_path / "device.csr", tmp_path / "device.pem"
        csr_file.write_bytes(device_csr("line-7-device-42"))
        result = subprocess.run(
            [
                CA_DAEMON,
                "client",
                "sign",
                "--target",
                env.target,
                "--csr",
                str(csr_file),
                "--out",
                str(out),
                "--request-id",
                str(uuid.uuid4()),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert "for device line-7-device-42" in result.stdout
        certs = x509.load_pem_x509_certificates(out.read_bytes())
        assert [c.subject.rfc4514_string() for c in certs] == [
            "CN=line-7-device-42",
            "CN=Factory Issuing CA 1,O=Example Devices",
            "CN=Outside Root CA",
        ]
        leaf_pem = certs[0].public_bytes(serialization.Encoding.PEM).decode()
        chain_pem = "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in certs[1:])
        verified = openssl_verify(tmp_path, leaf_pem, chain_pem)
        assert verified.returncode == 0, verified.stdout + verified.stderr
    finally:
        daemon.stop()


def test_import_cert_names_the_file_that_holds_no_pem_certificate_and_how_to_convert_der(tmp_path: Path, softhsm_conf: Path) -> None:
    """A parent CA's answer in DER, the CSR given by mistake or an empty file each failed with cryptography's
    "Unable to load PEM file. See https://cryptography.io/... MalformedFraming", naming neither --cert nor --chain nor the file."""
    env = make_env(tmp_path, softhsm_conf, init=False)
    csr_path = tmp_path / "ca.csr"
    env.cli("init", "--csr-out", str(csr_path), "--subject", "CN=Factory Issuing CA 1")
    parent = _ParentCa()
    der, root = tmp_path / "intermediate.der", tmp_path / "root.pem"
    der.write_bytes(parent.certify(csr_path.read_bytes()).public_bytes(serialization.Encoding.DER))
    root.write_bytes(parent.cert.public_bytes(serialization.Encoding.PEM))
    empty = tmp_path / "empty.pem"
    empty.write_bytes(b"")

    def refused(cert: Path, chain: Path) -> str:
        result = env.cli("ca", "import-cert", "--label", "ca-root-1", "--cert", str(cert), "--chain", str(chain), check=False)
        assert result.returncode == 1 and result.stdout == "", result
        return result.stderr

    pem = tmp_path / "intermediate.pem"
    convert = f"openssl x509 -inform der -in {der} -out {pem}"
    assert refused(der, root) == f"ca-daemon: --cert {der} is a DER certificate; give it as PEM: {convert}\n"
    no_certificate = "holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
    assert refused(csr_path, root) == (
        f"ca-daemon: --cert {csr_path} {no_certificate}: it is a certificate signing request, not the certificate made from it\n"
    )
    assert refused(root, empty) == f"ca-daemon: --chain {empty} {no_certificate}: it is empty\n"
    # The key ceremony's `key install-cert` reads its file the same way, before it dials the daemon (which it never
    # reaches here): a DER file failed with "'utf-8' codec can't decode byte 0x82", a CSR reached the daemon.
    for given, expected in ((der, f"is a DER certificate; give it as PEM: {convert}"), (csr_path, "is a certificate signing request")):
        ceremony = env.cli("key", "install-cert", "--key-id", "k2", "--cert", str(given), "--target", "127.0.0.1:9", check=False)
        assert ceremony.returncode == 1 and f"--cert {given} " in ceremony.stderr and expected in ceremony.stderr, ceremony
    subprocess.run(convert.split(), check=True, capture_output=True)  # what the message says to run
    installed = env.cli("ca", "import-cert", "--label", "ca-root-1", "--cert", str(pem), "--chain", str(root))
    assert installed.stdout == "installed certificate CN=Factory Issuing CA 1 for CA key ca-root-1\n"


def test_key_approve_names_a_missing_or_misplaced_successor_in_its_own_terms(tmp_path: Path, softhsm_conf: Path) -> None:
    """`key approve emergency` without --successor was answered with the RPC's terms ("an emergency switch names the
    successor key", field successor_key_id); --successor on another action was ignored. Both are refused before the
    daemon is dialled (none listens here)."""
    env = make_env(tmp_path, softhsm_conf, init=False)
    target = ["--key-id", "k1", "--target", "127.0.0.1:9"]
    missing = env.cli("key", "approve", "emergency", *target, check=False)
    assert missing.returncode == 1 and "key approve emergency needs --successor KEY" in missing.stderr, missing
    misplaced = env.cli("key", "approve", "activate", "--successor", "k2", *target, check=False)
    assert misplaced.returncode == 1 and "--successor is for key approve emergency only, not activate" in misplaced.stderr, misplaced


@pytest.mark.parametrize("key_type", ["rsa-2048", "ec-p384", "ed25519"])
def test_other_ca_key_types_issue_verifiable_certificates(tmp_path: Path, softhsm_conf: Path, key_type: str) -> None:
    env = make_env(tmp_path, softhsm_conf, key_type=key_type)
    daemon = Daemon(env, tmp_path / "daemon.log").start()
    try:
        csr_file, out = tmp_path / "device.csr", tmp_path / "device.pem"
        csr_file.write_bytes(device_csr(pem=False))
        result = subprocess.run(
            [CA_DAEMON, "client", "sign", "--target", env.target, "--csr", str(csr_file), "--out", str(out)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        certs = x509.load_pem_x509_certificates(out.read_bytes())
        pems = [c.public_bytes(serialization.Encoding.PEM).decode() for c in certs]
        assert openssl_verify(tmp_path, pems[0], "".join(pems[1:])).returncode == 0
    finally:
        daemon.stop()


def test_second_daemon_on_the_same_state_is_refused(tmp_path: Path, softhsm_conf: Path) -> None:
    env = make_env(tmp_path, softhsm_conf)
    daemon = Daemon(env, tmp_path / "daemon.log").start()
    try:
        second = env.cli("serve", check=False)
        assert second.returncode != 0
        assert "already running" in second.stderr or "already listening" in second.stderr
    finally:
        daemon.stop()


def test_the_verifier_refuses_devices_under_an_intermediate_its_parent_revoked(tmp_path: Path, softhsm_conf: Path) -> None:
    """The relying party checks the whole chain: our intermediate on the outside parent's CRL refuses its devices.

    Real HTTP for both CRLs (the daemon's and the parent's), and `openssl verify -crl_check_all` agrees at each step.
    """
    env, _http_port = crl_env(tmp_path, softhsm_conf, init=False)
    csr_path = tmp_path / "ca.csr"
    env.cli("init", "--csr-out", str(csr_path), "--subject", "CN=Factory Issuing CA 1,O=Example Devices")
    parent, crls = _ParentCa(), CrlServer()
    # As enterprise CAs often do, an LDAP distribution point first: the verifier fetches the HTTP one.
    ldap = "ldap:///CN=Outside%20Root%20CA,CN=CDP?certificateRevocationList"
    intermediate = parent.certify(csr_path.read_bytes(), crl_urls=(ldap, f"{crls.url}/parent.crl"))
    (tmp_path / "intermediate.pem").write_bytes(intermediate.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "root.pem").write_bytes(parent.cert.public_bytes(serialization.Encoding.PEM))
    env.cli(
        "ca", "import-cert", "--label", "ca-root-1", "--cert", str(tmp_path / "intermediate.pem"), "--chain", str(tmp_path / "root.pem")
    )
    crls.bodies["/parent.crl"] = parent.crl(1)
    daemon = Daemon(env, tmp_path / "daemon.log").start()
    try:
        device_key = ec.generate_private_key(ec.SECP256R1())
        with grpc.insecure_channel(env.target) as channel:
            request = ca_pb2.SignRequest(csr=make_csr(device_key, "line-7-device-43"), request_id=str(uuid.uuid4()))  # CN and SAN URI
            response = ca_pb2_grpc.CertificateAuthorityStub(channel).Sign(request, timeout=10)
        leaf = x509.load_pem_x509_certificate(response.certificate_pem.encode())
        verifier = DeviceVerifier([parent.cert], crls=CrlCache(max_age=0))  # revalidate every time: a new CRL shows at once

        def decide() -> str:
            challenge = verifier.challenge()
            return str(verifier.verify(leaf, [intermediate], challenge, sign_challenge(device_key, challenge)))

        our_crl_url = leaf.extensions.get_extension_for_class(x509.CRLDistributionPoints).value[0].full_name[0].value
        ours = tmp_path / "ours.crl.pem"
        ours.write_bytes(
            x509.load_der_x509_crl(urllib.request.urlopen(our_crl_url, timeout=10).read()).public_bytes(serialization.Encoding.PEM)
        )

        def openssl_with_crls() -> subprocess.CompletedProcess[str]:
            theirs = tmp_path / "parent.crl.pem"
            theirs.write_bytes(x509.load_der_x509_crl(crls.bodies["/parent.crl"]).public_bytes(serialization.Encoding.PEM))
            chain_pem = (
                intermediate.public_bytes(serialization.Encoding.PEM) + parent.cert.public_bytes(serialization.Encoding.PEM)
            ).decode()
            return openssl_verify(
                tmp_path, response.certificate_pem, chain_pem, "-crl_check_all", "-CRLfile", str(ours), "-CRLfile", str(theirs)
            )

        assert decide().startswith("GRANTED device line-7-device-43"), decide()
        assert openssl_with_crls().returncode == 0, openssl_with_crls().stdout + openssl_with_crls().stderr

        crls.bodies["/parent.crl"] = parent.crl(2, revoked=(intermediate.serial_number,))
        refused = decide()
        assert refused.startswith("REFUSED at step revocation"), refused
        assert "the intermediate CA certificate 'CN=Factory Issuing CA 1,O=Example Devices'" in refused
        assert "is revoked (key_compromise)" in refused
        verified = openssl_with_crls()
        assert verified.returncode != 0 and "certificate revoked" in verified.stdout + verified.stderr, verified.stdout + verified.stderr

        # Fail closed: a relying party that cannot get the parent's CRL (and holds no current copy) refuses.
        del crls.bodies["/parent.crl"]
        verifier = DeviceVerifier([parent.cert], crls=CrlCache(max_age=0))
        unreachable = decide()
        assert unreachable.startswith("REFUSED at step revocation") and "cannot fetch the CRL at" in unreachable and "404" in unreachable, (
            unreachable
        )

        # An intermediate whose only distribution point is LDAP cannot be checked here: refused, saying why.
        ldap_only = parent.certify(csr_path.read_bytes(), crl_urls=(ldap,))
        challenge = verifier.challenge()
        refused_ldap = str(verifier.verify(leaf, [ldap_only], challenge, sign_challenge(device_key, challenge)))
        assert "names no http(s) CRL distribution point (ldap:///" in refused_ldap, refused_ldap
    finally:
        daemon.stop()
        crls.close()
