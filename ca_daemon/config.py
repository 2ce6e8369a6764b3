"""One TOML file -> typed, validated settings.

Everything is checked here, at start-up (or reload), so a bad setting never surfaces
mid-request. Relative paths resolve against the directory of the configuration file.
PINs are never in the file: it names a file or an environment variable holding them.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
import tomllib
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from ca_daemon.errors import ConfigError
from ca_daemon.model import KeySpec

DEFAULT_DEVICE_ID_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"
DEFAULT_SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"


@dataclass(frozen=True)
class SecretSource:
    """Where a PIN comes from: a file (mode 0600 or stricter) or an environment variable."""

    file: Path | None = None
    env: str = ""

    def read(self) -> str:
        if self.file is not None:
            try:
                mode = self.file.stat().st_mode
                text = self.file.read_text().strip()
            except OSError as exc:
                raise ConfigError(f"cannot read PIN file {self.file}: {exc.strerror}") from None
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise ConfigError(f"PIN file {self.file} is readable by group or others; chmod 600 it")
            if not text:
                raise ConfigError(f"PIN file {self.file} is empty")
            return text
        value = os.environ.get(self.env, "")
        if not value:
            raise ConfigError(f"environment variable {self.env} (the PIN source) is not set")
        return value

    def describe(self) -> str:
        return f"file {self.file}" if self.file is not None else f"environment variable {self.env}"


@dataclass(frozen=True)
class ServerConfig:
    listen: str = "127.0.0.1:50051"
    dev_mode: bool = False
    workers: int = 2
    max_csr_bytes: int = 64 * 1024
    local_identity: str = "local-developer"
    http_listen: str = ""


@dataclass(frozen=True)
class HsmConfig:
    module: str
    pin: SecretSource
    token: str
    softhsm2_conf: Path | None = None


@dataclass(frozen=True)
class CaConfig:
    key_uri: str
    crl_distribution_points: tuple[str, ...] = ()
    ca_issuers_urls: tuple[str, ...] = ()
    backdate: timedelta = timedelta(minutes=1)


@dataclass(frozen=True)
class StoreConfig:
    url: str
    # SQLite: FULL makes every commit durable against power loss, not only crashes.
    sqlite_synchronous: str = "FULL"
    commit_batch_max: int = 256


@dataclass(frozen=True)
class ProfileConfig:
    name: str
    description: str = ""
    device_id_pattern: str = DEFAULT_DEVICE_ID_PATTERN
    validity: timedelta = timedelta(days=365)
    max_validity: timedelta = timedelta(days=365 * 3)


@dataclass(frozen=True)
class Config:
    path: Path
    state_dir: Path
    server: ServerConfig
    hsm: HsmConfig
    ca: CaConfig
    store: StoreConfig
    profiles: dict[str, ProfileConfig] = field(default_factory=dict)
    default_profile: str = "device"

    def profile(self, name: str) -> ProfileConfig:
        return self.profiles[name or self.default_profile]


def load(path: str | Path) -> Config:
    """Read and validate a configuration file; raise ConfigError naming the bad setting."""
    path = Path(path).resolve()
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"configuration file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse(raw, path)


def parse(raw: dict[str, Any], path: Path) -> Config:
    base = path.parent
    reader = _Reader(raw, "")
    state_dir = _resolve(base, reader.string("state_dir", "state"))

    server_raw = reader.table("server")
    server = ServerConfig(
        listen=server_raw.string("listen", "127.0.0.1:50051"),
        dev_mode=server_raw.boolean("dev_mode", False),
        workers=server_raw.integer("workers", 2, minimum=1, maximum=64),
        max_csr_bytes=server_raw.integer("max_csr_bytes", 64 * 1024, minimum=256, maximum=1024 * 1024),
        local_identity=server_raw.string("local_identity", "local-developer"),
        http_listen=server_raw.string("http_listen", ""),
    )
    host = _host_of(server.listen, "server.listen")
    if not server.dev_mode:
        raise ConfigError(
            "server.dev_mode = false needs mTLS, which this version does not provide yet; "
            "set server.dev_mode = true to serve plaintext gRPC on a loopback address"
        )
    if not _is_loopback(host):
        raise ConfigError(
            f"server.listen = {server.listen!r} is not a loopback address; development mode serves "
            "plaintext gRPC, so it may only bind 127.0.0.0/8, ::1 or localhost"
        )

    hsm_raw = reader.table("hsm")
    pin_file = hsm_raw.string("pin_file", "")
    pin_env = hsm_raw.string("pin_env", "")
    if bool(pin_file) == bool(pin_env):
        raise ConfigError("hsm: set exactly one of pin_file or pin_env (the PIN itself never goes in the file)")
    softhsm2_conf = hsm_raw.string("softhsm2_conf", "")
    ca_raw = reader.table("ca")
    key_uri = ca_raw.string("key", "")
    if not key_uri.startswith("pkcs11:"):
        raise ConfigError("ca.key must be an RFC 7512 pkcs11: URI naming the CA key, e.g. pkcs11:token=ca;object=ca-1")
    token = hsm_raw.string("token", "") or _uri_token(key_uri)
    hsm = HsmConfig(
        module=hsm_raw.string("module", DEFAULT_SOFTHSM_MODULE),
        pin=SecretSource(file=_resolve(base, pin_file) if pin_file else None, env=pin_env),
        token=token,
        softhsm2_conf=_resolve(base, softhsm2_conf) if softhsm2_conf else None,
    )
    ca = CaConfig(
        key_uri=key_uri,
        crl_distribution_points=tuple(ca_raw.string_list("crl_distribution_points", [])),
        ca_issuers_urls=tuple(ca_raw.string_list("ca_issuers_urls", [])),
        backdate=timedelta(seconds=ca_raw.integer("backdate_seconds", 60, minimum=0, maximum=86400)),
    )
    for url in ca.crl_distribution_points + ca.ca_issuers_urls:
        if not re.match(r"^https?://[^\s]+$", url):
            raise ConfigError(f"ca: {url!r} is not an http:// or https:// URL")

    store_raw = reader.table("store")
    url = store_raw.string("url", "")
    if url.startswith("sqlite:///"):
        db_path = url[len("sqlite:///") :]
        url = "sqlite:///" + str(_resolve(base, db_path))
    elif not url:
        url = "sqlite:///" + str(state_dir / "ca.db")
    elif not url.startswith(("postgresql://", "postgresql+psycopg://")):
        raise ConfigError(f"store.url {url!r}: use sqlite:///PATH or postgresql://...")
    synchronous = store_raw.string("sqlite_synchronous", "FULL").upper()
    if synchronous not in {"FULL", "NORMAL", "EXTRA"}:
        raise ConfigError("store.sqlite_synchronous must be FULL, EXTRA or NORMAL")
    store = StoreConfig(
        url=url,
        sqlite_synchronous=synchronous,
        commit_batch_max=store_raw.integer("commit_batch_max", 256, minimum=1, maximum=10000),
    )

    profiles: dict[str, ProfileConfig] = {}
    profiles_raw = reader.table("profiles")
    for name in profiles_raw.keys():
        p = profiles_raw.table(name)
        pattern = p.string("device_id_pattern", DEFAULT_DEVICE_ID_PATTERN)
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"profiles.{name}.device_id_pattern is not a valid regular expression: {exc}") from None
        validity = timedelta(days=p.integer("validity_days", 365, minimum=1, maximum=36500))
        max_validity = timedelta(days=p.integer("max_validity_days", max(validity.days, 365 * 3), minimum=1, maximum=36500))
        if validity > max_validity:
            raise ConfigError(f"profiles.{name}: validity_days exceeds max_validity_days")
        profiles[name] = ProfileConfig(
            name=name,
            description=p.string("description", ""),
            device_id_pattern=pattern,
            validity=validity,
            max_validity=max_validity,
        )
    if not profiles:
        profiles["device"] = ProfileConfig(name="device", description="Device identity certificate (clientAuth)")
    default_profile = reader.string("default_profile", "device")
    if default_profile not in profiles:
        raise ConfigError(f"default_profile {default_profile!r} is not one of the profiles: {sorted(profiles)}")
    return Config(
        path=path,
        state_dir=state_dir,
        server=server,
        hsm=hsm,
        ca=ca,
        store=store,
        profiles=profiles,
        default_profile=default_profile,
    )


def _uri_token(uri: str) -> str:
    match = re.search(r"(?:^pkcs11:|;)token=([^;?]+)", uri)
    if not match:
        raise ConfigError(f"ca.key {uri!r} must name its token (token=...)")
    from urllib.parse import unquote

    return unquote(match.group(1))


def _resolve(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p).resolve()


def _host_of(address: str, setting: str) -> str:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{setting} = {address!r} must be HOST:PORT")
    return host.strip("[]")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Reader:
    """Typed access to one TOML table that names the full setting in every error."""

    def __init__(self, raw: dict[str, Any], prefix: str) -> None:
        self._raw = raw
        self._prefix = prefix

    def _name(self, key: str) -> str:
        return f"{self._prefix}{key}"

    def keys(self) -> list[str]:
        return list(self._raw)

    def table(self, key: str) -> _Reader:
        value = self._raw.get(key, {})
        if not isinstance(value, dict):
            raise ConfigError(f"{self._name(key)} must be a table")
        return _Reader(value, f"{self._name(key)}.")

    def string(self, key: str, default: str) -> str:
        value = self._raw.get(key, default)
        if not isinstance(value, str):
            raise ConfigError(f"{self._name(key)} must be a string")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self._raw.get(key, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{self._name(key)} must be true or false")
        return value

    def integer(self, key: str, default: int, *, minimum: int, maximum: int) -> int:
        value = self._raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{self._name(key)} must be an integer")
        if not minimum <= value <= maximum:
            raise ConfigError(f"{self._name(key)} = {value} is out of range [{minimum}, {maximum}]")
        return value

    def string_list(self, key: str, default: list[str]) -> list[str]:
        value = self._raw.get(key, default)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{self._name(key)} must be a list of strings")
        return list(value)


def default_dev_config(*, token: str, key_label: str, listen: str, workers: int, softhsm2_conf: Path) -> str:
    """The configuration `ca-daemon init --dev` writes on first run."""
    return f"""\
# ca-daemon configuration written by `ca-daemon init --dev`. Every setting is documented
# in README.md ("Configuration"). Relative paths resolve against this file's directory.
state_dir = "."
default_profile = "device"

[server]
listen = "{listen}"
# Explicit local development mode: plaintext gRPC, loopback only, one local caller identity.
dev_mode = true
workers = {workers}
max_csr_bytes = 65536
local_identity = "local-developer"

[hsm]
module = "{DEFAULT_SOFTHSM_MODULE}"
softhsm2_conf = "{softhsm2_conf}"
token = "{token}"
pin_file = "pins/user.pin"

[ca]
key = "pkcs11:token={token};object={key_label}"
crl_distribution_points = ["http://127.0.0.1:8080/crl/{key_label}.crl"]
ca_issuers_urls = ["http://127.0.0.1:8080/ca/{key_label}.der"]
backdate_seconds = 60

[store]
url = "sqlite:///ca.db"
sqlite_synchronous = "FULL"

[profiles.device]
description = "Device identity certificate for TLS client authentication"
device_id_pattern = '{DEFAULT_DEVICE_ID_PATTERN}'
validity_days = 365
"""


__all__ = ["Config", "KeySpec", "load", "parse", "default_dev_config"]
