"""Factory to cloud with a real broker: Mosquitto trusts the daemon's CA and its CRL, devices connect with paho-mqtt.

A private Mosquitto (the Debian package) listens on a free loopback port with TLS,
`require_certificate true`, `use_identity_as_username true` (the certificate CN, i.e. the
device ID, becomes the MQTT user name; an ACL then lets each device publish only on its own
topic), the CA roots as cafile and the current full CRL of each CA key as crlfile. Its own server
certificate comes from the daemon, under a serverAuth profile added for the test.

Mosquitto reads full CRLs only (OpenSSL without X509_V_FLAG_USE_DELTAS ignores delta CRLs),
so after a revocation the operator publishes a full CRL at once (`ca-daemon crl publish`),
writes it for the broker (`ca-daemon client crl --format pem`) and reloads the broker (SIGHUP).

The daemon runs with mTLS (`ca-daemon mtls init`: two officers and a programming station) so
that its CA key can be rotated for real: devices are issued under key 1, two distinct officers
activate key 2 (README "Key rotation"; pre-publication set to 0 s), more devices are issued under
key 2, and the broker, trusting both roots with both keys' full CRLs, lets both generations in
and refuses a revoked device of either generation once the CRLs are republished.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import socket
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ca_daemon.client import CaClient, TlsOptions
from ca_daemon.simulate import Device, simulate
from tests.conftest import CA_DAEMON, CaEnv, Daemon, daemon_environment, free_port, wait_channel_serving
from tests.factory_helpers import ForeignCa
from tests.integration.crl_helpers import crl_env, start

mqtt = pytest.importorskip("paho.mqtt.client")

MOSQUITTO = "/usr/sbin/mosquitto"
README = Path(__file__).resolve().parents[2] / "README.md"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(MOSQUITTO).exists(), reason="the Debian mosquitto package is not installed (make system-deps)"),
]

KEY1 = "ca-root-1"  # made by `ca-daemon init`
KEY2 = "ca-root-2"
ROOT2_SUBJECT = "CN=ca-daemon rotated root CA 2"
CLIENTS = {"off1": "officer", "off2": "officer", "prog": "programmer"}

BROKER_PROFILE = r"""
[profiles.broker]
description = "MQTT broker server certificate (test)"
device_id_pattern = '^broker-[a-z0-9-]+$'
extended_key_usage = ["serverAuth"]
allow_reissue = true

[profiles.broker.san_allowed]
ip = '^127\.0\.0\.1$'
"""


@dataclass
class Ca:
    """One daemon over mTLS with two officers (dual control of key rotation) and a programming station, "prog"."""

    env: CaEnv
    daemon: Daemon
    tls_dir: Path
    client: CaClient  # as "prog"

    def tls(self, name: str) -> TlsOptions:
        return _tls(self.tls_dir, name)

    def cli_as(self, name: str, *args: str) -> subprocess.CompletedProcess[str]:
        """`ca-daemon ARGS` over mTLS as client NAME (what an officer or operator types)."""
        tls = self.tls(name)
        return self.env.cli(
            *args, "--target", self.env.target, "--tls-ca", str(tls.ca_bundle), "--tls-cert", str(tls.cert), "--tls-key", str(tls.key)
        )

    def roots_pem(self) -> dict[str, str]:
        """Every published CA certificate by key ID (a pending key's too: that is pre-publication)."""
        return {c.key_id: c.certificate_pem for c in self.client.ca_certificates()}

    def full_crls_pem(self, *key_ids: str) -> dict[str, bytes]:
        """Publish a full CRL of every key that signs CRLs now (Mosquitto ignores deltas); return those of key_ids, PEM."""
        self.env.cli("crl", "publish")
        return {k: x509.load_der_x509_crl(self.client.crl(issuer_key_id=k).der).public_bytes(serialization.Encoding.PEM) for k in key_ids}


@contextlib.contextmanager
def _ca(base: Path, softhsm_conf: Path) -> Iterator[Ca]:
    env, _ = crl_env(base, softhsm_conf)
    # A real rotation, minus the week of pre-publication (0 is the allowed minimum); the worker follows the new key within 200 ms.
    env.edit_config("prepublication_seconds = 604800", "prepublication_seconds = 0\npoll_interval_ms = 200")
    tls_dir = env.state_dir / "tls"
    clients = [arg for name, role in CLIENTS.items() for arg in ("--client", f"{name}:{role}")]
    env.cli("mtls", "init", "--out", str(tls_dir), *clients, "--apply")
    env.config_path.write_text(env.config_path.read_text() + BROKER_PROFILE)
    env.edit_config('[callers."prog"]\nprofiles = ["device"]\n', '[callers."prog"]\nprofiles = ["device", "broker"]\n')
    daemon = Daemon(env, base / f"daemon-{uuid.uuid4().hex[:8]}.log")
    try:
        with daemon.log_path.open("ab") as log:
            daemon.process = subprocess.Popen(
                [CA_DAEMON, "--config", str(env.config_path), "serve"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=daemon_environment(),
                start_new_session=True,
            )
        _wait_serving(daemon, _tls(tls_dir, "prog"))
        with CaClient(env.target, tls=_tls(tls_dir, "prog")) as client:
            yield Ca(env, daemon, tls_dir, client)
    finally:
        daemon.stop()


def _tls(tls_dir: Path, name: str) -> TlsOptions:
    clients = tls_dir / "clients"
    return TlsOptions(tls_dir / "ca.pem", clients / f"{name}.pem", clients / f"{name}.key")


def _wait_serving(daemon: Daemon, tls: TlsOptions) -> None:
    """conftest.wait_serving speaks plaintext; this daemon answers only mTLS clients."""
    with grpc.secure_channel(daemon.env.target, tls.credentials()) as channel:
        wait_channel_serving(channel, 40, daemon.process, daemon.log)


def _rotate(ca: Ca, subject: str) -> None:
    """The key ceremony of README "Key rotation": officer 1 makes key 2 a self-signed root with the two link
    certificates (which publishes it); officer 1 approves its activation, which changes nothing; officer 2's approval
    activates it; the daemon's worker switches to it without a restart."""
    ca.cli_as("off1", "key", "create", "--label", KEY2)
    made = ca.cli_as("off1", "key", "self-sign", "--key-id", KEY2, "--subject", subject)
    assert "2 link certificate(s)" in made.stdout, made.stdout
    first = ca.cli_as("off1", "key", "approve", "activate", "--key-id", KEY2)
    assert "(1 of 2 distinct officers); nothing changed yet" in first.stdout, first.stdout + first.stderr
    assert {c.key_id: c.status for c in ca.client.ca_certificates()} == {KEY1: "active", KEY2: "pending"}
    second = ca.cli_as("off2", "key", "approve", "activate", "--key-id", KEY2)
    assert f"CA key {KEY2} is active; {KEY1} is superseded" in second.stdout, second.stdout + second.stderr
    assert "officers: off1, off2" in second.stderr, second.stderr
    deadline = time.monotonic() + 10
    while f"switched the signing CA key from {KEY1} to {KEY2}" not in ca.daemon.log():
        assert time.monotonic() < deadline, ca.daemon.log()[-3000:]
        time.sleep(0.1)


class Broker:
    """A private Mosquitto on a free loopback port."""

    def __init__(self, directory: Path, port: int) -> None:
        self.directory = directory
        self.port = port
        self.log = directory / "mosquitto.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Broker:
        d = self.directory
        (d / "acl").write_text(
            "pattern write factory/%u\nuser {monitor}\ntopic read factory/#\n".replace("{monitor}", (d / "monitor").read_text())
        )
        (d / "mosquitto.conf").write_text(
            f"""per_listener_settings false
persistence false
user root
log_dest file {self.log}
log_type all
acl_file {d / "acl"}
listener {self.port} 127.0.0.1
cafile {d / "cafile.pem"}
certfile {d / "broker.crt"}
keyfile {d / "broker.key"}
crlfile {d / "crl.pem"}
require_certificate true
use_identity_as_username true
"""
        )
        self.process = subprocess.Popen([MOSQUITTO, "-c", str(d / "mosquitto.conf")], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"mosquitto exited with {self.process.returncode}: {self.log.read_text() if self.log.exists() else ''}"
                )
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.05)
        raise AssertionError("mosquitto did not listen")

    def reload(self) -> None:
        """SIGHUP: Mosquitto re-reads its configuration and rebuilds the listener's TLS context (CRL included)."""
        assert self.process is not None
        mark = self.log.stat().st_size
        self.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while b"Reloading config" not in self.log.read_bytes()[mark:]:
            assert time.monotonic() < deadline, "mosquitto did not log the reload"
            time.sleep(0.05)
        time.sleep(0.3)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


@dataclass
class Outcome:
    connected: bool
    detail: str
    published: bool = False


def connect_and_publish(broker: Broker, home: Path, device_id: str, *, topic: str = "", timeout: float = 5.0) -> Outcome:
    """Connect as the device in `home` (device.crt, device.key) and publish on topic (default factory/DEVICE_ID) with QoS 1."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{device_id}-{uuid.uuid4().hex[:6]}", protocol=mqtt.MQTTv311)
    client.tls_set(ca_certs=str(broker.directory / "cafile.pem"), certfile=str(home / "device.crt"), keyfile=str(home / "device.key"))
    answered = threading.Event()
    result: dict[str, str] = {}

    def on_connect(_c: object, _u: object, _flags: object, reason: object, _p: object) -> None:
        result["connack"] = str(reason)
        answered.set()

    def on_disconnect(_c: object, _u: object, _flags: object, reason: object, _p: object) -> None:
        result.setdefault("disconnect", str(reason))
        answered.set()

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    try:
        client.connect("127.0.0.1", broker.port, keepalive=10)
    except (ssl.SSLError, OSError) as exc:
        return Outcome(False, f"TLS handshake refused: {exc}")
    client.loop_start()
    try:
        answered.wait(timeout)
        if result.get("connack") != "Success":
            return Outcome(False, f"no CONNACK Success: {result or 'no answer'}")
        info = client.publish(topic or f"factory/{device_id}", f"hello from {device_id}".encode(), qos=1)
        info.wait_for_publish(timeout)
        return Outcome(True, "connected", info.is_published())
    finally:
        client.disconnect()
        client.loop_stop()


class Monitor:
    """A subscriber (itself a device of our CA) that collects what reaches factory/#."""

    def __init__(self, broker: Broker, home: Path, device_id: str) -> None:
        self.received: dict[str, bytes] = {}
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv311)
        self._client.tls_set(
            ca_certs=str(broker.directory / "cafile.pem"), certfile=str(home / "device.crt"), keyfile=str(home / "device.key")
        )
        subscribed = threading.Event()
        self._client.on_connect = lambda c, *_: c.subscribe("factory/#", qos=1)
        self._client.on_subscribe = lambda *_: subscribed.set()
        self._client.on_message = lambda _c, _u, message: self.received.__setitem__(message.topic, message.payload)
        self._client.connect("127.0.0.1", broker.port, keepalive=10)
        self._client.loop_start()
        assert subscribed.wait(10), "the monitor could not subscribe"

    def wait_for(self, topic: str, timeout: float = 5.0) -> bytes | None:
        deadline = time.monotonic() + timeout
        while topic not in self.received and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.received.get(topic)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def _broker_certificate(client: CaClient, directory: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = f"broker-{uuid.uuid4().hex[:8]}"
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    issued = client.sign(csr.public_bytes(serialization.Encoding.PEM), profile="broker")
    (directory / "broker.crt").write_text(issued.certificate_pem + issued.chain_pem)
    fd = os.open(directory / "broker.key", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


def _openssl_verify(cafile: Path, crlfile: Path, leaf: Path) -> subprocess.CompletedProcess[str]:
    """What OpenSSL, and so Mosquitto with `crlfile` set (X509_V_FLAG_CRL_CHECK: the leaf's CRL), decides for leaf."""
    return subprocess.run(
        ["openssl", "verify", "-crl_check", "-CAfile", str(cafile), "-CRLfile", str(crlfile), str(leaf)],
        capture_output=True,
        text=True,
        check=False,
    )


def _provision(ca: Ca, out: Path, count: int, prefix: str) -> list[Device]:
    devices: list[Device] = []
    summary = simulate(ca.client, devices=count, out_dir=out, prefix=prefix, concurrency=4, on_issued=lambda d, _i: devices.append(d))
    assert summary.issued == count, summary.lines()
    return sorted(devices, key=lambda d: d.device_id)


def test_devices_of_both_key_generations_connect_revoked_and_foreign_are_refused(tmp_path: Path, softhsm_conf: Path) -> None:
    broker_dir = tmp_path / "broker"
    broker_dir.mkdir()
    out = tmp_path / "devices"
    run = uuid.uuid4().hex[:6]
    with _ca(tmp_path / "ca", softhsm_conf) as ca:
        # Generation 1: the broker's certificate, a line of devices and the monitor, all under key 1.
        _broker_certificate(ca.client, broker_dir)
        devices = _provision(ca, out, 4, f"line{run}")
        monitor_device = _provision(ca, out, 1, f"monitor{run}")[0]
        (broker_dir / "monitor").write_text(monitor_device.device_id)

        # The CA rotates to key 2 through the real ceremony; generation 2 is issued under it.
        _rotate(ca, ROOT2_SUBJECT)
        second_key_devices = _provision(ca, out, 2, f"key2{run}")
        roots_pem = ca.roots_pem()
        roots = {k: x509.load_pem_x509_certificate(pem.encode()) for k, pem in roots_pem.items()}
        assert roots[KEY2].subject.rfc4514_string() == ROOT2_SUBJECT and roots[KEY1].subject != roots[KEY2].subject
        for generation, key_id in ((devices, KEY1), (second_key_devices, KEY2)):
            for device in generation:
                leaf = x509.load_pem_x509_certificate((out / device.device_id / "device.crt").read_bytes())
                leaf.verify_directly_issued_by(roots[key_id])

        # What the broker holds after the roll-over. cafile: both roots. The operator added root 2 to
        # the broker's trust store while key 2 was pre-published (that is what pre-publication is for),
        # and keeps root 1 while key 1's devices are in the field. The link certificates do not help a
        # broker: Mosquitto builds the path only from its cafile and what the device sends, and a
        # device sends its own certificate, not old-signs-new (links serve relying parties that can
        # only trust root 1 and build paths with fetched intermediates; test_rotation.py covers them).
        # crlfile: the full CRL of each key, one after the other (OpenSSL picks each leaf's CRL by its
        # issuer); with CRL checking on, a leaf whose issuer has no CRL there is refused.
        (broker_dir / "cafile.pem").write_text(roots_pem[KEY1] + roots_pem[KEY2])
        crls = ca.full_crls_pem(KEY1, KEY2)
        (broker_dir / "crl.pem").write_bytes(crls[KEY1] + crls[KEY2])
        key1_crl_only = tmp_path / "key1-crl-only.pem"
        key1_crl_only.write_bytes(crls[KEY1])
        leaf2 = out / second_key_devices[1].device_id / "device.crt"
        missing = _openssl_verify(broker_dir / "cafile.pem", key1_crl_only, leaf2)
        assert missing.returncode != 0 and "unable to get certificate CRL" in missing.stdout + missing.stderr, missing
        assert _openssl_verify(broker_dir / "cafile.pem", broker_dir / "crl.pem", leaf2).returncode == 0
        broker = Broker(broker_dir, free_port()).start()
        monitor = None
        try:
            monitor = Monitor(broker, out / monitor_device.device_id, monitor_device.device_id)
            # Every device of both generations connects with its issued certificate and publishes; the
            # broker knows it by its certificate CN (the ACL lets it write only factory/<its device ID>).
            for device in (*devices, *second_key_devices):
                outcome = connect_and_publish(broker, out / device.device_id, device.device_id)
                assert outcome.connected and outcome.published, (device.device_id, outcome, broker.log.read_text()[-2000:])
                assert monitor.wait_for(f"factory/{device.device_id}") == f"hello from {device.device_id}".encode()
            # The identity is the certificate's, not the client's say: publishing as another device is dropped by the ACL.
            assert f"u'{devices[0].device_id}'" in broker.log.read_text()  # "New client connected ... (p2, c1, k10, u'<CN>')"
            spoof = f"factory/{devices[2].device_id}/spoofed"
            outcome = connect_and_publish(broker, out / devices[1].device_id, devices[1].device_id, topic=spoof)
            assert outcome.connected and monitor.wait_for(spoof, timeout=1.0) is None

            # A device with a certificate from another CA (same shape, same device ID) is refused.
            foreign = ForeignCa.create("Not our factory CA")
            foreign_home = tmp_path / "foreign"
            foreign_home.mkdir()
            key = ec.generate_private_key(ec.SECP256R1())
            (foreign_home / "device.crt").write_bytes(
                foreign.issue(key.public_key(), devices[1].device_id).public_bytes(serialization.Encoding.PEM)
            )
            (foreign_home / "device.key").write_bytes(
                key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
            )
            outcome = connect_and_publish(broker, foreign_home, devices[1].device_id)
            assert not outcome.connected, outcome

            # After the rotation, revoke a device of each generation: the superseded key 1 still signs
            # its CRLs. Full CRLs published now, written for the broker, broker reloaded -> both refused.
            revoked = (devices[0], second_key_devices[0])
            for device in revoked:
                serial = f"{x509.load_pem_x509_certificate((out / device.device_id / 'device.crt').read_bytes()).serial_number:x}"
                ca.cli_as("prog", "client", "revoke", "--serial", serial, "--reason", "key-compromise")
            before = connect_and_publish(broker, out / devices[0].device_id, devices[0].device_id)
            assert before.connected, "the broker refused the device before it learnt of the revocation"
            ca.env.cli("crl", "publish")
            for key_id in (KEY1, KEY2):
                ca.cli_as("prog", "client", "crl", "--issuer-key-id", key_id, "--format", "pem", "--out", str(broker_dir / f"{key_id}.crl"))
            (broker_dir / "crl.pem").write_bytes((broker_dir / f"{KEY1}.crl").read_bytes() + (broker_dir / f"{KEY2}.crl").read_bytes())
            broker.reload()
            for device in revoked:
                outcome = connect_and_publish(broker, out / device.device_id, device.device_id)
                assert not outcome.connected, (device.device_id, outcome, broker.log.read_text()[-2000:])
                # Why it failed, judged by openssl with exactly the broker's files: the certificate is revoked.
                why = _openssl_verify(broker_dir / "cafile.pem", broker_dir / "crl.pem", out / device.device_id / "device.crt")
                assert why.returncode != 0 and "certificate revoked" in why.stdout + why.stderr, why
            assert "certificate verify failed" in broker.log.read_text()
            # ...and only those devices: the others of both generations still connect.
            for device in (*devices[1:], *second_key_devices[1:]):
                outcome = connect_and_publish(broker, out / device.device_id, device.device_id)
                assert outcome.connected, (device.device_id, outcome)
        finally:
            if monitor is not None:
                monitor.close()
            broker.stop()


def _readme_broker_configuration() -> str:
    """The Mosquitto configuration README "Brokers that read only full CRLs" gives, as a reader copies it."""
    text = README.read_text()
    start_at = text.index("# /etc/mosquitto/conf.d/devices.conf\n")
    return text[start_at : text.index("```", start_at)]


def test_the_readmes_broker_configuration_works_as_written(tmp_path: Path, softhsm_conf: Path) -> None:
    """The README's devices.conf, pasted with only its paths and port changed, runs Mosquitto, and a device connects.

    The files are made with the commands its comments name (`ca export`, `client crl --format pem`).
    """
    env, _ = crl_env(tmp_path / "ca", softhsm_conf)
    env.config_path.write_text(env.config_path.read_text() + BROKER_PROFILE)
    env.edit_config(
        '[callers."local-developer"]\nprofiles = ["device"]\n', '[callers."local-developer"]\nprofiles = ["device", "broker"]\n'
    )
    daemon = start(env, tmp_path)
    broker_dir = tmp_path / "broker"
    broker_dir.mkdir()
    try:
        with CaClient(env.target) as client:
            _broker_certificate(client, broker_dir)
            devices: list[Device] = []
            summary = simulate(client, devices=1, out_dir=tmp_path / "devices", on_issued=lambda d, _i: devices.append(d))
            assert summary.issued == 1, summary.lines()
        env.cli("ca", "export", "--out", str(broker_dir / "ca-chain.pem"))
        env.cli("client", "crl", "--format", "pem", "--out", str(broker_dir / "ca.crl"))
    finally:
        daemon.stop()
    (broker_dir / "acl").write_text("pattern write factory/%u\n")
    (broker_dir / "cafile.pem").write_bytes((broker_dir / "ca-chain.pem").read_bytes())  # what connect_and_publish trusts
    port = free_port()
    pasted = (
        _readme_broker_configuration().replace("/etc/mosquitto/", f"{broker_dir}/").replace("listener 8883", f"listener {port} 127.0.0.1")
    )
    assert f"listener {port} 127.0.0.1" in pasted and "/etc/" not in pasted, pasted
    # This machine's own needs (a private broker run by the test as root), before the reader's lines.
    broker = Broker(broker_dir, port)
    (broker_dir / "mosquitto.conf").write_text(f"persistence false\nuser root\nlog_dest file {broker.log}\nlog_type all\n{pasted}")
    output = broker_dir / "mosquitto.out"  # what it says before its log is open
    with output.open("wb") as out:
        broker.process = subprocess.Popen([MOSQUITTO, "-c", str(broker_dir / "mosquitto.conf")], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while True:
            if broker.process.poll() is not None:
                log = broker.log.read_text() if broker.log.exists() else ""
                said = output.read_text(errors="replace")
                raise AssertionError(f"mosquitto refused the README's configuration (exit {broker.process.returncode}): {said}{log}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline, "mosquitto did not listen"
            time.sleep(0.05)
        device = devices[0]
        outcome = connect_and_publish(broker, tmp_path / "devices" / device.device_id, device.device_id)
        assert outcome.connected and outcome.published, (outcome, broker.log.read_text()[-2000:])
    finally:
        broker.stop()
