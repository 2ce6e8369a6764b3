"""Keys are made and used inside a real SoftHSM token and never leave it."""

from __future__ import annotations

import asyncio
import datetime
import glob
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import NameOID

from ca_daemon import config as config_module
from ca_daemon.audit import Checkpointer
from ca_daemon.errors import ConfigError, FailedPrecondition, HsmUnavailable
from ca_daemon.hsm import Hsm, Pkcs11Uri
from ca_daemon.model import KeySpec
from ca_daemon.store import SqlStore
from tests.conftest import CaEnv, make_env

MODULE = config_module.DEFAULT_SOFTHSM_MODULE


@pytest.fixture(scope="module")
def token_env(tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path) -> CaEnv:
    return make_env(tmp_path_factory.mktemp("hsm"), softhsm_conf, init=False)


@pytest.fixture(scope="module")
def hsm(token_env: CaEnv) -> Iterator[Hsm]:
    with Hsm.open(MODULE, token_env.token, token_env.user_pin) as h:
        yield h


@pytest.mark.parametrize("spec", list(KeySpec), ids=lambda s: s.value)
def test_generated_key_is_sensitive_and_signs_verifiable_certificates(hsm: Hsm, spec: KeySpec) -> None:
    assert hsm.supports(spec)
    generated = hsm.generate_key(spec, f"key-{spec.value}")
    assert hsm.private_key_attributes(generated.uri) == {"token": True, "private": True, "sensitive": True, "extractable": False}
    key = hsm.private_key(generated.uri)
    assert hsm.key_spec(generated.uri) == spec
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, spec.value)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())  # type: ignore[attr-defined]
        .serial_number(7)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, None if spec is KeySpec.ED25519 else hashes.SHA256())  # type: ignore[arg-type]
    )
    cert.verify_directly_issued_by(cert)
    assert (
        cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        == generated.public_key_der
    )
    with pytest.raises(TypeError, match="lives in the HSM"):
        key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())  # type: ignore[attr-defined]


def test_raw_signatures_verify_with_the_public_key(hsm: Hsm) -> None:
    ec_key = hsm.private_key(hsm.generate_key(KeySpec.EC_P384, "raw-ec").uri)
    signature = ec_key.sign(b"message", ec.ECDSA(hashes.SHA384()))  # type: ignore[attr-defined]
    ec_key.public_key().verify(signature, b"message", ec.ECDSA(hashes.SHA384()))  # type: ignore[attr-defined]
    rsa_key = hsm.private_key(hsm.generate_key(KeySpec.RSA_2048, "raw-rsa").uri)
    signature = rsa_key.sign(b"message", padding.PKCS1v15(), hashes.SHA256())  # type: ignore[attr-defined]
    rsa_key.public_key().verify(signature, b"message", padding.PKCS1v15(), hashes.SHA256())  # type: ignore[attr-defined]
    assert isinstance(rsa_key, rsa.RSAPrivateKey)
    ed_key = hsm.private_key(hsm.generate_key(KeySpec.ED25519, "raw-ed").uri)
    assert isinstance(ed_key, ed25519.Ed25519PrivateKey)
    ed_key.public_key().verify(ed_key.sign(b"message"), b"message")


def test_pkcs11_tool_sees_the_key_and_cannot_read_its_value(hsm: Hsm, token_env: CaEnv) -> None:
    generated = hsm.generate_key(KeySpec.EC_P256, "visible-to-pkcs11-tool")
    # The test PIN goes through the environment ("env:"), never argv.
    env = {"SOFTHSM2_CONF": str(token_env.softhsm_conf), "PATH": "/usr/bin:/bin", "PKCS11_PIN": token_env.user_pin}
    base = ["pkcs11-tool", "--module", MODULE, "--token-label", token_env.token, "--login", "--pin", "env:PKCS11_PIN"]
    listing = subprocess.run([*base, "--list-objects", "--type", "privkey"], capture_output=True, text=True, env=env, check=False)
    assert listing.returncode == 0, listing.stderr
    objects = listing.stdout.split("Private Key Object")
    ours = [o for o in objects if "label:      visible-to-pkcs11-tool" in o]
    assert len(ours) == 1, listing.stdout
    assert f"ID:         {generated.uri.key_id.hex()}" in ours[0]
    assert "Access:     sensitive, always sensitive, never extractable, local" in ours[0]
    read = subprocess.run(
        [*base, "--read-object", "--type", "privkey", "--id", generated.uri.key_id.hex()],
        capture_output=True,
        env=env,
        check=False,
    )
    assert read.stdout == b""
    # Asking the token directly for CKA_VALUE is refused as sensitive.
    probe = subprocess.run(
        [sys.executable, "-c", _READ_VALUE, MODULE, token_env.token, "visible-to-pkcs11-tool"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert probe.stdout.strip() == "AttributeSensitive", probe.stderr


_READ_VALUE = """
import os, sys, pkcs11
from pkcs11 import Attribute, ObjectClass
token = pkcs11.lib(sys.argv[1]).get_token(token_label=sys.argv[2])
with token.open(user_pin=os.environ["PKCS11_PIN"]) as session:
    key = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=sys.argv[3])
    try:
        key[Attribute.VALUE]
        print("READABLE")
    except pkcs11.exceptions.AttributeSensitive:
        print("AttributeSensitive")
"""


def test_missing_token_is_refused_with_a_reason(token_env: CaEnv) -> None:
    with pytest.raises(HsmUnavailable, match="not found"):
        Hsm.open(MODULE, "no-such-token", token_env.user_pin)


def test_uri_round_trip() -> None:
    uri = Pkcs11Uri(token="factory ca", label="key;1", key_id=b"\x01\xff")
    assert Pkcs11Uri.parse(str(uri)) == uri
    assert str(uri) == "pkcs11:token=factory%20ca;object=key%3B1;id=%01%ff"


def test_service_resumes_after_the_token_comes_back(hsm: Hsm, token_env: CaEnv, softhsm_conf: Path, tmp_path: Path) -> None:
    generated = hsm.generate_key(KeySpec.EC_P256, "comes-and-goes")
    digest = b"\x11" * 32
    assert len(hsm.sign_raw(generated.uri, digest, "ecdsa")) == 64
    token_dirs = _token_dirs(softhsm_conf, token_env.token)
    away = str(tmp_path / "token-away")  # outside directories.tokendir: a token renamed inside it is found again
    shutil.move(token_dirs[0], away)
    try:
        with pytest.raises(HsmUnavailable):
            hsm.sign_raw(generated.uri, digest, "ecdsa")
        assert not hsm.healthy
        time.sleep(0.6)  # past the reconnect interval: the probe really tries, and fails
        assert not asyncio.run(hsm.probe())
    finally:
        shutil.move(away, token_dirs[0])
    _wait_probe_reconnects(hsm)  # by itself, without a signature asking for the token
    assert hsm.healthy
    assert len(hsm.sign_raw(generated.uri, digest, "ecdsa")) == 64


def _token_dirs(softhsm_conf: Path, label: str) -> list[str]:
    """The one token directory of label, as a list (moved away and back by the tests)."""
    found = [d for d in glob.glob(str(softhsm_conf.parent / "tokens" / "*")) if _token_label(Path(d)) == label]
    assert len(found) == 1
    return found


def _wait_probe_reconnects(hsm: Hsm) -> None:
    deadline = time.monotonic() + 5
    while not asyncio.run(hsm.probe()):
        assert time.monotonic() < deadline, "the probe did not reconnect once the token was back"
        time.sleep(0.2)


def _token_label(directory: Path) -> str:
    data = (directory / "token.object").read_bytes() if (directory / "token.object").exists() else b""
    for label in (part for part in data.split(b"\x00") if part):
        text = label.decode(errors="ignore").strip()
        if text.startswith("test-"):
            return text[: text.find(" ") if " " in text else len(text)]
    return ""


def test_a_key_first_looked_up_while_the_token_is_away_is_unavailable_not_missing(
    token_env: CaEnv, softhsm_conf: Path, tmp_path: Path
) -> None:
    """SoftHSM's session of a token that went away finds no objects and says nothing: a key not yet looked up was
    NOT_FOUND, and stayed so after the token came back (a hostile review: every Sign of a fresh worker, for good).
    And health noticed the outage only once a call had failed: an idle worker stayed SERVING throughout."""
    with Hsm.open(MODULE, token_env.token, token_env.user_pin) as maker:
        generated = maker.generate_key(KeySpec.EC_P256, "looked-up-late")
    token_dirs = _token_dirs(softhsm_conf, token_env.token)
    with Hsm.open(MODULE, token_env.token, token_env.user_pin) as fresh:  # has looked up no key yet
        assert asyncio.run(fresh.probe())
        away = str(tmp_path / "token-away")
        shutil.move(token_dirs[0], away)
        try:
            assert not asyncio.run(fresh.probe())  # idle, and still it notices
            time.sleep(0.6)  # past the reconnect interval
            with pytest.raises(HsmUnavailable):
                fresh.sign_raw(generated.uri, b"\x11" * 32, "ecdsa")
        finally:
            shutil.move(away, token_dirs[0])
        _wait_probe_reconnects(fresh)
        assert len(fresh.sign_raw(generated.uri, b"\x11" * 32, "ecdsa")) == 64


def test_a_new_token_is_made_after_this_process_saw_another_token_away_and_back(tmp_path: Path) -> None:
    """python-pkcs11 keeps the module initialised, and SoftHSM marks a token it once found missing as broken until
    the next C_Initialize. A token moved away and back while this process looked (the CI run of 2026-11-27: the test
    process, during a test that moves a token away) made every later initialize_token fail on that slot with
    'C_GetTokenInfo failed with CKR 0x5', and with it the set-up of each CA after it. In a process and token
    directory of its own, so that a regression cannot break the rest of the session's tokens."""
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    conf = tmp_path / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
    script = _AWAY_AND_BACK.format(module=MODULE, tokens=str(tokens), away=str(tmp_path / "away"))
    environment = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    ran = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=60, env=environment)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert ran.stdout.split() == ["away-seen", "made", "first-again", "second"], ran.stdout


_AWAY_AND_BACK = """
import shutil
import pkcs11
from ca_daemon.hsm import initialize_token

initialize_token({module!r}, "first", "so-pin-1", "user-pin-1")
(token_dir,) = __import__("pathlib").Path({tokens!r}).iterdir()
shutil.move(token_dir, {away!r})
lib = pkcs11.lib({module!r})
try:
    lib.get_token(token_label="first")
except pkcs11.exceptions.PKCS11Error:
    print("away-seen")
shutil.move({away!r}, token_dir)
initialize_token({module!r}, "second", "so-pin-2", "user-pin-2")
print("made")
with lib.get_token(token_label="first").open(user_pin="user-pin-1"):
    print("first-again")
with lib.get_token(token_label="second").open(user_pin="user-pin-2"):
    print("second")
"""


def test_start_up_reasons_name_what_is_wrong(token_env: CaEnv, tmp_path: Path) -> None:
    """Three reasons that did not say what was wrong (a hostile review): 'GeneralError' for a missing SoftHSM
    configuration, 'PKCS11Error' for a module that is no library, and a UnicodeDecodeError for a binary PIN file."""
    not_a_library = tmp_path / "libnot-pkcs11.so"
    not_a_library.write_text("x\n")
    with pytest.raises(ConfigError, match=f"cannot load PKCS#11 module {not_a_library}: .*file too short"):
        Hsm.open(str(not_a_library), token_env.token, token_env.user_pin)
    # In a process of its own: SoftHSM reads its configuration once per process, and this one has read it.
    opened = subprocess.run(
        [sys.executable, "-c", "import sys; from ca_daemon.hsm import Hsm; Hsm.open(*sys.argv[1:])", MODULE, token_env.token, "1234"],
        capture_output=True,
        text=True,
        env={**os.environ, "SOFTHSM2_CONF": str(tmp_path / "missing-softhsm2.conf")},
        check=False,
    )
    assert "SoftHSM says this when its configuration file" in opened.stderr, opened.stderr
    pin_file = tmp_path / "user.pin"
    pin_file.write_bytes(b"\xff\xfe1234\n")
    pin_file.chmod(0o600)
    with pytest.raises(ConfigError, match=f"PIN file {pin_file} is not UTF-8 text"):
        config_module.SecretSource(file=pin_file).read()


def test_an_audit_key_the_token_cannot_be_asked_for_is_not_called_missing(token_env: CaEnv, softhsm_conf: Path, tmp_path: Path) -> None:
    """Missing, `ca-daemon init` makes it; the token away, init would not help (and would make a second key): a CI log
    had a worker restarted while the token was away say 'run ca-daemon init to create it'."""
    store = SqlStore(f"sqlite:///{tmp_path / 'ca.db'}")
    uri = f"pkcs11:token={token_env.token};object=audit-never-made"
    try:
        with Hsm.open(MODULE, token_env.token, token_env.user_pin) as hsm:
            with pytest.raises(FailedPrecondition, match="ca-daemon init"):
                Checkpointer(hsm, store, uri)
            token_dirs = _token_dirs(softhsm_conf, token_env.token)
            away = str(tmp_path / "token-away")
            shutil.move(token_dirs[0], away)
            try:
                time.sleep(0.6)  # past the reconnect interval
                with pytest.raises(HsmUnavailable) as unavailable:
                    Checkpointer(hsm, store, uri)
            finally:
                shutil.move(away, token_dirs[0])
            assert "audit key" in unavailable.value.message and "init" not in unavailable.value.message, unavailable.value.message
            _wait_probe_reconnects(hsm)
    finally:
        store.close()
