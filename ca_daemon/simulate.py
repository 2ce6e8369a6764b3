"""A factory line in software: devices make their own keys and CSRs, the programming station gets them signed.

For each simulated device: generate a key pair on the "device" (EC P-256 by default), make a
CSR with its device ID as subject CN and as SAN URI (urn:dev:ops:{device_id}, what the
default profile allows), send only the CSR through `CaClient.sign`, and install the
certificate, the chain and the key into the device's own directory (key mode 0600).

The private key never leaves the device: it is created in `Device`, written only to the
device's directory, and the only bytes handed to the client are the CSR's (a test scans
the daemon's database, WAL and log for every device's private key to prove it).

A leaf module for users: it depends on the client and `cryptography`, never on the server side.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from ca_daemon.client import CaClient, Issued, UnexpectedAnswer
from ca_daemon.files import fsync_path

KEY_TYPES = ("ec-p256", "ec-p384", "ed25519", "rsa-2048")
DEFAULT_SAN_URI = "urn:dev:ops:{device_id}"
# Refusals are answers about the request (policy, permission, a duplicate); anything else is a failure.
REFUSED_CODES = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.ALREADY_EXISTS})

DeviceKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey


def generate_key(key_type: str = "ec-p256") -> DeviceKey:
    """The device's key pair, made on the device."""
    if key_type == "ec-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "ec-p384":
        return ec.generate_private_key(ec.SECP384R1())
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if key_type == "rsa-2048":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(f"unknown device key type {key_type!r}; use one of {', '.join(KEY_TYPES)}")


def make_csr(key: DeviceKey, device_id: str, san_uri_template: str = DEFAULT_SAN_URI) -> bytes:
    """A PEM CSR signed by the device key: CN = device ID, and a SAN URI from the template (empty: none)."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
    if san_uri_template:
        uri = san_uri_template.replace("{device_id}", device_id)
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA384() if _is_p384(key) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)


def _is_p384(key: DeviceKey) -> bool:
    return isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"


@dataclass
class Device:
    """One simulated device: its ID and its key, which stays here and in its own directory."""

    device_id: str
    key: DeviceKey
    csr_pem: bytes

    @classmethod
    def make(cls, device_id: str, key_type: str = "ec-p256", san_uri_template: str = DEFAULT_SAN_URI) -> Device:
        key = generate_key(key_type)
        return cls(device_id, key, make_csr(key, device_id, san_uri_template))

    def install(self, directory: Path, issued: Issued) -> Path:
        """Write device.key (0600, PKCS#8 PEM), device.crt, chain.pem and fullchain.pem into directory/DEVICE_ID (0700).

        All or nothing: the files are written and flushed in a new directory of another name, renamed to the
        device's once all are there. Written in place, a run stopped midway left half a file, or a new key beside
        an earlier run's certificate, in a directory that looked installed. An earlier install is replaced whole:
        exchanged with the new directory in one step, then removed, so that a run killed at any point leaves the
        earlier install or the new one. (Moved aside and removed before the new one was renamed into place, a run
        killed in between left the device no directory.) Where the system cannot exchange two directories, the
        earlier install is moved aside, the new one renamed into place (the earlier one moved back if that fails)
        and only then the earlier one removed: a run killed between the two moves leaves both whole, hidden.
        """
        home = directory / self.device_id
        directory.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{self.device_id}.", suffix=".new", dir=directory))  # mode 0700
        try:
            key_pem = self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
            _write(staging / "device.key", key_pem, 0o600)
            _write(staging / "device.crt", issued.certificate_pem.encode(), 0o644)
            _write(staging / "chain.pem", issued.chain_pem.encode(), 0o644)
            _write(staging / "fullchain.pem", (issued.certificate_pem + issued.chain_pem).encode(), 0o644)
            fsync_path(staging)
            earlier = _replace_directory(staging, home)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        fsync_path(directory)
        if earlier is not None:
            shutil.rmtree(earlier, ignore_errors=True)  # left behind, it is a hidden .DEVICE_ID.*.old (or .new) directory
        return home


def _replace_directory(new: Path, target: Path) -> Path | None:
    """Put the directory new in target's place; return where the earlier target now is (to be removed), or None."""
    if not target.exists():
        os.rename(new, target)
        return None
    if _exchange(new, target):
        return new
    earlier = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    try:
        os.replace(target, earlier)  # a directory is renamed only onto an empty one
    except BaseException:
        os.rmdir(earlier)
        raise
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(earlier, target)
        raise
    return earlier


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100  # fcntl.h: paths relative to the working directory


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directory entries in one step (Linux renameat2 RENAME_EXCHANGE, which os does not offer).

    False where this system or file system cannot (another OS, a C library or kernel without renameat2, or a
    file system that does not support the flag); any other error is raised.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except AttributeError:
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(error, os.strerror(error), str(a), None, str(b))


def _write(path: Path, data: bytes, mode: int) -> None:
    """Create with the final mode from the start (no window in which a key file is readable by others), flushed to disk."""
    with open(path, "xb", opener=lambda p, flags: os.open(p, flags, mode)) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@dataclass
class Summary:
    """What a run did. Rates are devices per second of wall-clock time."""

    requested: int = 0
    issued: int = 0
    refused: int = 0
    failed: int = 0
    elapsed_s: float = 0.0
    # Wall-clock time of the separate key generation phase (pregenerate), or 0 when pipelined.
    keygen_phase_s: float = 0.0
    # Key generation + CSR time summed over devices (CPU-ish time, pipelined or not).
    keygen_total_s: float = 0.0
    retries: int = 0
    reasons: Counter[str] = field(default_factory=Counter)

    @property
    def rate(self) -> float:
        """Issued devices per second, end to end, key generation included."""
        return self.issued / self.elapsed_s if self.elapsed_s else 0.0

    @property
    def rate_excluding_keygen(self) -> float | None:
        """Issued per second of the signing phase alone; known only when keys were pre-generated."""
        signing = self.elapsed_s - self.keygen_phase_s
        return self.issued / signing if self.keygen_phase_s and signing > 0 else None

    def lines(self) -> list[str]:
        done = self.issued + self.refused + self.failed
        out = [
            f"devices: {self.requested} requested, {self.issued} issued, {self.refused} refused, {self.failed} failed"
            + (f" ({self.requested - done} not attempted)" if done < self.requested else ""),
            f"time: {self.elapsed_s:.2f} s; {self.rate:.1f} devices/s end to end (device key generation included)",
        ]
        excluding = self.rate_excluding_keygen
        if excluding is not None:
            out.append(f"key generation phase: {self.keygen_phase_s:.2f} s; {excluding:.1f} devices/s excluding device key generation")
        if self.requested and self.keygen_phase_s:
            out.append(f"device key + CSR: {1000 * self.keygen_phase_s / self.requested:.3f} ms per device (wall time of the phase)")
        elif self.requested:
            # Summed over worker threads, so it includes time spent waiting for a core.
            out.append(f"device key + CSR: {1000 * self.keygen_total_s / self.requested:.2f} ms of worker-thread time per device")
        if self.retries:
            out.append(f"UNAVAILABLE or timed-out calls retried: {self.retries}")
        for reason, count in self.reasons.most_common(5):
            out.append(f"  {count} x {reason}")
        return out


class Progress:
    """A plain-text progress bar on a stream (stderr): redrawn in place on a terminal, a line per 10% otherwise."""

    def __init__(self, total: int, stream: TextIO | None = None, width: int = 30) -> None:
        self._total = max(total, 1)
        self._stream = stream if stream is not None else sys.stderr
        self._tty = self._stream.isatty()
        self._width = width
        self._started = time.perf_counter()
        self._last_draw = 0.0
        self._last_decile = -1

    def update(self, done: int, issued: int, refused: int, failed: int, *, final: bool = False) -> None:
        now = time.perf_counter()
        decile = done * 10 // self._total
        if self._tty and not final and now - self._last_draw < 0.1:
            return
        if not self._tty and not final and decile == self._last_decile:
            return
        self._last_draw, self._last_decile = now, decile
        filled = self._width * done // self._total
        rate = done / (now - self._started) if now > self._started else 0.0
        text = (
            f"[{'#' * filled}{'.' * (self._width - filled)}] {done}/{self._total} {100 * done // self._total:3d}% "
            f"{rate:7.1f}/s  issued {issued} refused {refused} failed {failed}"
        )
        self._stream.write(("\r" + text + ("\n" if final else "")) if self._tty else text + "\n")
        self._stream.flush()


def simulate(
    client: CaClient,
    *,
    devices: int,
    out_dir: Path | None,
    prefix: str = "",
    concurrency: int = 8,
    key_type: str = "ec-p256",
    profile: str = "",
    san_uri_template: str = DEFAULT_SAN_URI,
    pregenerate: bool = False,
    progress: Progress | None = None,
    on_issued: Callable[[Device, Issued], None] | None = None,
) -> Summary:
    """Provision `devices` simulated devices through `client`; return the summary.

    out_dir None provisions without installing (for benchmarks). With pregenerate, every
    device makes its key and CSR first (timed as its own phase), so the summary reports the
    rate with and without key generation; otherwise key generation and signing overlap, as
    on a real line where each device computes its own key.
    """
    if devices < 1 or concurrency < 1:
        raise ValueError("--devices and --concurrency must be at least 1")
    generate_key(key_type)  # fail on a bad key type before anything is sent
    prefix = prefix or f"sim-{uuid.uuid4().hex[:8]}"
    ids = [f"{prefix}-{index:06d}" for index in range(devices)]
    summary = Summary(requested=devices)
    lock = threading.Lock()
    run_id = uuid.uuid4().hex[:12]
    retried_before = client.retried

    def make(device_id: str) -> Device:
        started = time.perf_counter()
        device = Device.make(device_id, key_type, san_uri_template)
        with lock:
            summary.keygen_total_s += time.perf_counter() - started
        return device

    def provision(item: str | Device) -> None:
        device = make(item) if isinstance(item, str) else item
        try:
            # The request_id makes a retried Sign return the same certificate (idempotent by request_id).
            issued = client.sign(device.csr_pem, request_id=f"{run_id}-{device.device_id}", profile=profile)
        except grpc.RpcError as exc:
            code = exc.code()
            with lock:
                if code in REFUSED_CODES:
                    summary.refused += 1
                else:
                    summary.failed += 1
                summary.reasons[f"{code.name}: {(exc.details() or '')[:160]}"] += 1
            _report(progress, summary, lock)
            return
        except UnexpectedAnswer as exc:  # a certificate not for this device's key: never installed
            with lock:
                summary.failed += 1
                summary.reasons[f"answer refused: {str(exc)[:160]}"] += 1
            _report(progress, summary, lock)
            return
        if out_dir is not None:
            device.install(out_dir, issued)
        if on_issued is not None:
            on_issued(device, issued)
        with lock:
            summary.issued += 1
        _report(progress, summary, lock)

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="device") as pool:
        work: list[str] | list[Device] = ids
        if pregenerate:
            work = list(pool.map(make, ids))
            summary.keygen_phase_s = time.perf_counter() - started
        for _ in pool.map(provision, work):
            pass
    summary.elapsed_s = time.perf_counter() - started
    summary.retries = client.retried - retried_before
    if progress is not None:
        progress.update(summary.issued + summary.refused + summary.failed, summary.issued, summary.refused, summary.failed, final=True)
    return summary


def _report(progress: Progress | None, summary: Summary, lock: threading.Lock) -> None:
    if progress is None:
        return
    with lock:
        progress.update(summary.issued + summary.refused + summary.failed, summary.issued, summary.refused, summary.failed)


__all__ = ["DEFAULT_SAN_URI", "KEY_TYPES", "Device", "Progress", "Summary", "generate_key", "make_csr", "simulate"]
