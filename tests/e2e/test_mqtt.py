"""Factory to cloud with a real broker: Mosquitto trusts the daemon's CA and its CRL, devices connect with paho-mqtt.

A private Mosquitto (the Debian package) listens on a free loopback port with TLS,
`require_certificate true`, `use_identity_as_username true` (the certificate CN, i.e. the
device ID, becomes the MQTT user name; an ACL then lets each device publish only on its own
topic), the CA chain as cafile and the current full CRL as crlfile. Its own server
certificate comes from the daemon, under a serverAuth profile added for the test.

Mosquitto reads full CRLs only (OpenSSL without X509_V_FLAG_USE_DELTAS ignores delta CRLs),
so after a revocation the operator publishes a full CRL at once (`ca-daemon crl publish`),
writes it for the broker (`ca-daemon client crl --format pem`) and reloads the broker (SIGHUP).

Key rotation (issue 7) is not built yet. The rotated-key case is simulated with a second CA
key (its own token, root and daemon) whose certificate is in the broker's cafile and whose
CRL is in its crlfile, which is what a broker needs during a rotation's overlap.
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

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ca_daemon.client import CaClient
from ca_daemon.simulate import Device, simulate
from tests.conftest import CaEnv, Daemon, free_port
from tests.factory_helpers import ForeignCa
from tests.integration.crl_helpers import crl_env, start

mqtt = pytest.importorskip("paho.mqtt.client")

MOSQUITTO = "/usr/sbin/mosquitto"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(MOSQUITTO).exists(), reason="the Debian mosquitto package is not installed (make system-deps)"),
]

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
    env: CaEnv
    daemon: Daemon
    client: CaClient

    def full_crl_pem(self) -> bytes:
        """Publish a full CRL now (Mosquitto ignores deltas) and return it as the broker reads it."""
        self.env.cli("crl", "publish")
        return x509.load_der_x509_crl(self.client.crl().der).public_bytes(serialization.Encoding.PEM)


@contextlib.contextmanager
def _ca(base: Path, softhsm_conf: Path, *, broker_profile: bool) -> Iterator[Ca]:
    env, _ = crl_env(base, softhsm_conf)
    if broker_profile:
        env.edit_config(
            '[callers."local-developer"]\nprofiles = ["device"]\n', '[callers."local-developer"]\nprofiles = ["device", "broker"]\n'
        )
        env.config_path.write_text(env.config_path.read_text() + BROKER_PROFILE)
    daemon = start(env, base)
    try:
        with CaClient(env.target) as client:
            yield Ca(env, daemon, client)
    finally:
        daemon.stop()


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


def _broker_certificate(ca: Ca, directory: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = f"broker-{uuid.uuid4().hex[:8]}"
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    issued = ca.client.sign(csr.public_bytes(serialization.Encoding.PEM), profile="broker")
    (directory / "broker.crt").write_text(issued.certificate_pem + issued.chain_pem)
    fd = os.open(directory / "broker.key", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


def _provision(ca: Ca, out: Path, count: int, prefix: str) -> list[Device]:
    devices: list[Device] = []
    summary = simulate(ca.client, devices=count, out_dir=out, prefix=prefix, concurrency=4, on_issued=lambda d, _i: devices.append(d))
    assert summary.issued == count, summary.lines()
    return sorted(devices, key=lambda d: d.device_id)


def test_devices_connect_revoked_and_foreign_are_refused_second_key_connects(tmp_path: Path, softhsm_conf: Path) -> None:
    broker_dir = tmp_path / "broker"
    broker_dir.mkdir()
    out = tmp_path / "devices"
    run = uuid.uuid4().hex[:6]
    with _ca(tmp_path / "ca1", softhsm_conf, broker_profile=True) as ca, _ca(tmp_path / "ca2", softhsm_conf, broker_profile=False) as ca2:
        _broker_certificate(ca, broker_dir)
        devices = _provision(ca, out, 4, f"line{run}")
        monitor_device = _provision(ca, out, 1, f"monitor{run}")[0]
        second_key_device = _provision(ca2, out, 1, f"key2{run}")[0]
        (broker_dir / "monitor").write_text(monitor_device.device_id)
        # Trust both CA keys (as during a rotation's overlap); one full CRL per key.
        (broker_dir / "cafile.pem").write_text(ca.client.chain_pem() + ca2.client.chain_pem())
        (broker_dir / "crl.pem").write_bytes(ca.full_crl_pem() + ca2.full_crl_pem())
        broker = Broker(broker_dir, free_port()).start()
        monitor = None
        try:
            monitor = Monitor(broker, out / monitor_device.device_id, monitor_device.device_id)
            # Every device of the line connects with its issued certificate and publishes; the broker
            # knows it by its certificate CN (the ACL lets it write only factory/<its device ID>).
            for device in devices:
                outcome = connect_and_publish(broker, out / device.device_id, device.device_id)
                assert outcome.connected and outcome.published, (device.device_id, outcome, broker.log.read_text()[-2000:])
                assert monitor.wait_for(f"factory/{device.device_id}") == f"hello from {device.device_id}".encode()
            # The identity is the certificate's, not the client's say: publishing as another device is dropped by the ACL.
            assert f"u'{devices[0].device_id}'" in broker.log.read_text()  # "New client connected ... (p2, c1, k10, u'<CN>')"
            spoof = f"factory/{devices[2].device_id}/spoofed"
            outcome = connect_and_publish(broker, out / devices[1].device_id, devices[1].device_id, topic=spoof)
            assert outcome.connected and monitor.wait_for(spoof, timeout=1.0) is None

            # A device issued under the second CA key connects too.
            outcome = connect_and_publish(broker, out / second_key_device.device_id, second_key_device.device_id)
            assert outcome.connected and outcome.published, outcome

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

            # Revoke a device: full CRL published now, written for the broker, broker reloaded -> refused.
            revoked = devices[0]
            serial = f"{x509.load_pem_x509_certificate((out / revoked.device_id / 'device.crt').read_bytes()).serial_number:x}"
            ca.env.cli("client", "revoke", "--target", ca.env.target, "--serial", serial, "--reason", "key-compromise")
            before = connect_and_publish(broker, out / revoked.device_id, revoked.device_id)
            assert before.connected, "the broker refused the device before it learnt of the revocation"
            ca.env.cli("crl", "publish")
            ca.env.cli("client", "crl", "--target", ca.env.target, "--format", "pem", "--out", str(broker_dir / "crl-ca1.pem"))
            (broker_dir / "crl.pem").write_bytes((broker_dir / "crl-ca1.pem").read_bytes() + ca2.full_crl_pem())
            broker.reload()
            outcome = connect_and_publish(broker, out / revoked.device_id, revoked.device_id)
            assert not outcome.connected, (outcome, broker.log.read_text()[-2000:])
            assert "certificate verify failed" in broker.log.read_text()
            # Why it failed, judged by openssl with exactly the broker's files: the certificate is revoked.
            why = subprocess.run(
                [
                    *("openssl", "verify", "-crl_check", "-CAfile", str(broker_dir / "cafile.pem")),
                    *("-CRLfile", str(broker_dir / "crl.pem"), str(out / revoked.device_id / "device.crt")),
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            assert why.returncode != 0 and "certificate revoked" in why.stdout + why.stderr, why
            # ...and only that device: the others, and the second key's device, still connect.
            for device in (*devices[1:], second_key_device):
                outcome = connect_and_publish(broker, out / device.device_id, device.device_id)
                assert outcome.connected, (device.device_id, outcome)
        finally:
            if monitor is not None:
                monitor.close()
            broker.stop()
