"""One TOML file -> typed, validated settings.

Everything is checked here, at start-up (or reload), so a bad setting never surfaces
mid-request. Relative paths resolve against the directory of the configuration file.
PINs are never in the file: it names a file or an environment variable holding them.
"""

from __future__ import annotations

import difflib
import hashlib
import ipaddress
import os
import re
import socket
import stat
import tomllib
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from ca_daemon.environ_block import blank_value
from ca_daemon.errors import ConfigError
from ca_daemon.http_paths import request_path
from ca_daemon.model import LINK_PROFILE, KeySpec

DEFAULT_DEVICE_ID_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"
DEFAULT_SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"


# Environment PINs this process took out of its environment (SecretSource.withdraw): read() still finds
# them here, and no process started from now on inherits them.
_WITHDRAWN: dict[str, str] = {}


@dataclass(frozen=True)
class SecretSource:
    """Where a PIN comes from: a file (mode 0600 or stricter) or an environment variable."""

    file: Path | None = None
    env: str = ""

    def read(self) -> str:
        if self.file is not None:
            file = self.path()
            try:
                mode = file.stat().st_mode
                text = file.read_text().strip()
            except OSError as exc:
                raise ConfigError(f"cannot read PIN file {file}: {exc.strerror}") from None
            except UnicodeDecodeError as exc:  # the message would quote the byte, never the file
                raise ConfigError(f"PIN file {file} is not UTF-8 text (byte {exc.start})") from None
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise ConfigError(f"PIN file {file} is readable by group or others; chmod 600 it")
            if not text:
                raise ConfigError(f"PIN file {file} is empty")
            return text
        value = os.environ.get(self.env, "") or _WITHDRAWN.get(self.env, "")
        if not value:
            raise ConfigError(f"environment variable {self.env} (the PIN source) is not set")
        return value

    def withdraw(self) -> None:
        """Move an environment PIN out of this process's environment, so that no child process inherits it.

        read() still returns it. The daemon's workers get it from their parent over multiprocessing's
        pipe (withdrawn_secrets, adopt_secrets), never through their environment or argv. Its value is
        also blanked in the block the kernel shows as /proc/PID/environ (environ_block.py).
        """
        if self.env and self.env in os.environ:
            _WITHDRAWN[self.env] = os.environ[self.env]
            blank_value(self.env)
            del os.environ[self.env]

    def path(self) -> Path:
        """The PIN file, with $VARIABLES expanded when read: "$CREDENTIALS_DIRECTORY/user.pin" is a systemd credential."""
        assert self.file is not None
        expanded = os.path.expandvars(str(self.file))
        if "$" in expanded:
            raise ConfigError(
                f"PIN file {self.file}: {expanded[expanded.index('$') :].split('/')[0]} is not set "
                "(CREDENTIALS_DIRECTORY is set by systemd for a unit with LoadCredential=)"
            )
        return Path(expanded)

    def describe(self) -> str:
        return f"file {self.file}" if self.file is not None else f"environment variable {self.env}"


def withdrawn_secrets() -> dict[str, str]:
    """The environment PINs this process withdrew, for the worker processes it starts (see SecretSource.withdraw)."""
    return dict(_WITHDRAWN)


def adopt_secrets(values: dict[str, str]) -> None:
    """In a worker: the PINs its parent withdrew from the environment, for SecretSource.read."""
    _WITHDRAWN.update(values)


CPU_AFFINITY_MODES = ("auto", "off")
CPU_SCHEDULING_MODES = ("batch", "normal")


@dataclass(frozen=True)
class ServerConfig:
    listen: str = "127.0.0.1:50051"
    dev_mode: bool = False
    workers: int = 2
    # "auto": with at least as many workers as CPUs, worker i keeps to CPU i (see app.worker_cpus); "off": the kernel places them.
    cpu_affinity: str = "auto"
    # "batch": the workers' threads run under Linux SCHED_BATCH (see app.worker_main); "normal": SCHED_OTHER.
    cpu_scheduling: str = "batch"
    max_csr_bytes: int = 64 * 1024
    # Open client connections one worker's TLS front end accepts (handshaking ones included).
    max_connections: int = 1024
    # New TLS connections one client address may open a second in each worker, in bursts of twice as many; 0: no limit.
    tls_handshakes_per_client: int = 100
    # Calls one worker handles at once (health and reflection not counted); one more is UNAVAILABLE (see service.ErrorInterceptor).
    max_calls_in_flight: int = 2048
    # A client connection is asked to reconnect (HTTP/2 GOAWAY) after this long, 0 for never (see app.start_worker).
    max_connection_age_seconds: int = 1800
    local_identity: str = "local-developer"
    http_listen: str = ""
    # Connections one client address (an IPv6 /64) may hold at once on the CRL HTTP port (see http.DistributionServer).
    http_connections_per_client: int = 32


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
    # How long the group commit waits for more records before committing (see store/group_commit.py).
    commit_linger_ms: int = 5


# Names a profile may use in its settings, mapped to what the policy layer understands.
SUBJECT_ATTRIBUTES = ("CN", "O", "OU", "C", "L", "ST", "serialNumber", "DC", "UID")
EC_CURVES = ("P-256", "P-384", "P-521", "secp256k1")
CSR_SIGNATURE_ALGORITHMS = (
    "ecdsa-with-SHA256",
    "ecdsa-with-SHA384",
    "ecdsa-with-SHA512",
    "sha256WithRSAEncryption",
    "sha384WithRSAEncryption",
    "sha512WithRSAEncryption",
    "rsassa-pss",
    "ed25519",
)
# Never allowed, whatever a profile says: collisions are practical (SHA-1) or trivial (MD5).
WEAK_CSR_SIGNATURE_ALGORITHMS = ("sha1WithRSAEncryption", "ecdsa-with-SHA1", "md5WithRSAEncryption", "dsa-with-sha1")
SAN_TYPES = ("dns", "uri", "email", "ip")
LEAF_KEY_USAGES = ("digitalSignature", "contentCommitment", "keyEncipherment", "dataEncipherment", "keyAgreement")
# The leaf key usages a certificate of each device key type may carry, and the RFC that says so: an RSA key encrypts
# or signs but agrees on no key (RFC 3279 2.3.1, RFC 4055 1.2); an EC key signs or agrees on a key but encrypts
# nothing (RFC 5480 3); an Ed25519 key only signs (RFC 8410 5). pkilint flags each other usage
# (pkix.key_usage_value_prohibited_for_rsa, _for_ec, _for_edwards_curve). encipherOnly and decipherOnly, which
# RFC 5480 allows only beside keyAgreement, are not leaf usages a profile can name.
KEY_USAGES_OF_KEY_TYPE: dict[str, tuple[tuple[str, ...], str]] = {
    "RSA": (("digitalSignature", "contentCommitment", "keyEncipherment", "dataEncipherment"), "RFC 3279 and RFC 4055"),
    "EC": (("digitalSignature", "contentCommitment", "keyAgreement"), "RFC 5480"),
    "Ed25519": (("digitalSignature", "contentCommitment"), "RFC 8410"),
}
EXTENDED_KEY_USAGES = ("clientAuth", "serverAuth", "codeSigning", "emailProtection", "timeStamping")
LINT_MODES = ("template", "full", "off")
DEVICE_ID_PLACEHOLDER = "{device_id}"


@dataclass(frozen=True)
class ProfileConfig:
    """One `[profiles.NAME]` table: the rules a CSR must pass and what the certificate gets.

    The defaults are the secure device profile: EC P-256/P-384, RSA 2048-8192 with e=65537,
    Ed25519; subject = exactly one CN matching device_id_pattern and nothing else; no SANs
    but those the templates add; requested extensions other than SAN dropped; one active
    certificate per device ID.
    """

    name: str
    description: str = ""
    device_id_pattern: str = DEFAULT_DEVICE_ID_PATTERN
    validity: timedelta = timedelta(days=365)
    max_validity: timedelta = timedelta(days=365 * 3)
    ec_curves: tuple[str, ...] = ("P-256", "P-384")
    rsa_min_bits: int = 2048
    rsa_max_bits: int = 8192
    ed25519: bool = True
    csr_signature_algorithms: tuple[str, ...] = CSR_SIGNATURE_ALGORITHMS
    subject_required: tuple[str, ...] = ("CN",)
    # Attribute (other than CN, whose pattern is device_id_pattern) -> regular expression.
    subject_allowed: tuple[tuple[str, str], ...] = ()
    subject_max_length: int = 64
    # SAN type (dns, uri, email, ip) -> regular expression; "{device_id}" stands for the escaped device ID.
    san_allowed: tuple[tuple[str, str], ...] = ()
    # SANs every certificate gets, e.g. "urn:dev:ops:{device_id}" (a URI).
    san_templates: tuple[str, ...] = ()
    # What happens to requested extensions other than SAN: "drop" or "refuse".
    requested_extensions: str = "drop"
    key_usage: tuple[str, ...] = ("digitalSignature",)
    extended_key_usage: tuple[str, ...] = ("clientAuth",)
    allow_reissue: bool = False


@dataclass(frozen=True)
class LintConfig:
    """Pre-issuance linting: "template" (pkilint once per certificate shape, fast checks of
    what varies per certificate), "full" (pkilint on every certificate) or "off"."""

    mode: str = "template"


@dataclass(frozen=True)
class CrlConfig:
    """`[crl]`: when full (base) and delta CRLs are published, how long each is valid, and where.

    A CRL must stay valid until its successor is due, with room for a missed run, so each
    validity is checked to exceed its interval. Delta CRLs are optional (delta = false).
    """

    full_interval: timedelta = timedelta(hours=24)
    full_validity: timedelta = timedelta(days=7)
    delta: bool = True
    delta_interval: timedelta = timedelta(minutes=5)
    delta_validity: timedelta = timedelta(hours=1)
    # Publish a delta as soon as a revocation is seen (within check_interval) instead of on the schedule.
    publish_on_revoke: bool = True
    check_interval: timedelta = timedelta(seconds=1)
    # Where every published CRL is also written, atomically; None: files are not written.
    directory: Path | None = None
    # Where the delta is published, named in the base's Freshest CRL; default derived from
    # ca.crl_distribution_points ("x.crl" -> "x-delta.crl").
    delta_distribution_points: tuple[str, ...] = ()


ROLES = ("programmer", "officer", "auditor", "admin")


@dataclass(frozen=True)
class TlsConfig:
    """`[tls]`: the gRPC server's certificate and key (PEM files), the client CAs and their CRLs.

    The server key is a file, not an HSM key: the TLS front end (tls_front.py, Python's ssl)
    loads it from a file and has no PKCS#11 hook. It is a short-lived TLS key that `ca-daemon mtls init` makes on
    this host; the key that matters (the internal mTLS CA that certifies server and clients,
    `ca_key`) stays in the HSM. Files are checked when the daemon starts, not here, so
    `ca-daemon mtls init` can run with a configuration that names files it will create.
    """

    cert_file: Path | None = None
    key_file: Path | None = None
    client_ca_file: Path | None = None
    client_crl_file: Path | None = None
    # The primary worker re-signs client_crl when it is the internal CA's and expires within this.
    client_crl_refresh: timedelta = timedelta(days=30)
    # The internal mTLS CA key in the HSM that `ca-daemon mtls` issues server and client certificates with.
    ca_key_uri: str = ""

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None


@dataclass(frozen=True)
class RoleGrant:
    """Who holds a role: an exact identity, or a pattern over the certificate's SAN URIs ("uri:") or OUs ("ou:")."""

    role: str
    kind: str  # "identity", "uri" or "ou"
    value: str


@dataclass(frozen=True)
class AuditConfig:
    """`[audit]`: the HSM key that signs chain checkpoints, and how often they are written."""

    key_uri: str
    checkpoint_interval: timedelta = timedelta(minutes=5)
    # Hash-chain events; false is refused outside development mode (benchmarks compare the two).
    chain: bool = True


@dataclass(frozen=True)
class MetricsConfig:
    """`[metrics]`: where Prometheus scrapes (empty: no metrics endpoint).

    With [tls], the endpoint is HTTPS, TLS 1.3 only, and requires a client certificate from
    tls.client_ca (the scraper's); in development mode it is plaintext on loopback only.
    """

    listen: str = ""


@dataclass(frozen=True)
class RotationConfig:
    """`[rotation]`: CA key roll-over under dual control (see rotation.py and README "Key rotation")."""

    # Two distinct officers must approve an action within this window; older approvals lapse.
    approval_window: timedelta = timedelta(hours=24)
    # A new key's certificate is published this long before the key may be activated.
    prepublication: timedelta = timedelta(days=7)
    # How often every worker checks the store for a newly activated key.
    poll_interval: timedelta = timedelta(seconds=1)


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
    # Caller identity -> the profiles it may ask for (`[callers."IDENTITY"] profiles = [...]`).
    callers: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # Caller identity -> certificates it may have issued per hour (`max_certificates_per_hour`); absent: no limit.
    caller_quotas: dict[str, int] = field(default_factory=dict)
    lint: LintConfig = field(default_factory=LintConfig)
    crl: CrlConfig = field(default_factory=CrlConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    roles: tuple[RoleGrant, ...] = ()
    audit: AuditConfig = field(default_factory=lambda: AuditConfig(key_uri=""))
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    rotation: RotationConfig = field(default_factory=RotationConfig)

    def profile(self, name: str) -> ProfileConfig:
        return self.profiles[name or self.default_profile]


def file_digest(path: Path) -> bytes:
    """SHA-256 of a configuration file's bytes (empty if it cannot be read): what each worker records at a reload,
    and what `ca-daemon reload` compares with what it checked."""
    try:
        return hashlib.sha256(path.read_bytes()).digest()
    except OSError:
        return b""


def load(path: str | Path) -> Config:
    """Read and validate a configuration file; raise ConfigError naming the bad setting."""
    path = Path(path).resolve()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"configuration file not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read the configuration file {path}: {exc.strerror}") from None
    return loads(data, path)


def loads(data: bytes, path: Path) -> Config:
    """Validate the bytes of the configuration file path (relative paths in it resolve against path's directory)."""
    try:
        raw = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 (byte {exc.start}); TOML files are UTF-8") from None
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
        cpu_affinity=server_raw.string("cpu_affinity", "auto"),
        cpu_scheduling=server_raw.string("cpu_scheduling", "batch"),
        max_csr_bytes=server_raw.integer("max_csr_bytes", 64 * 1024, minimum=256, maximum=1024 * 1024),
        max_connections=server_raw.integer("max_connections", 1024, minimum=1, maximum=1_000_000),
        tls_handshakes_per_client=server_raw.integer("tls_handshakes_per_client", 100, minimum=0, maximum=100_000),
        max_calls_in_flight=server_raw.integer("max_calls_in_flight", 2048, minimum=1, maximum=1_000_000),
        max_connection_age_seconds=server_raw.integer("max_connection_age_seconds", 1800, minimum=0, maximum=7 * 86400),
        local_identity=server_raw.string("local_identity", "local-developer"),
        http_listen=server_raw.string("http_listen", ""),
        http_connections_per_client=server_raw.integer("http_connections_per_client", 32, minimum=1, maximum=512),
    )
    if server.cpu_affinity not in CPU_AFFINITY_MODES:
        raise ConfigError(f"server.cpu_affinity = {server.cpu_affinity!r}: use one of {', '.join(CPU_AFFINITY_MODES)}")
    if server.cpu_scheduling not in CPU_SCHEDULING_MODES:
        raise ConfigError(f"server.cpu_scheduling = {server.cpu_scheduling!r}: use one of {', '.join(CPU_SCHEDULING_MODES)}")
    host = _host_of(server.listen, "server.listen")
    if server.http_listen:
        _host_of(server.http_listen, "server.http_listen")  # CRLs are public: any address may serve them
    tls = _parse_tls(reader.table("tls"), base)
    if not server.dev_mode and not tls.enabled:
        raise ConfigError(
            "server.dev_mode = false needs mTLS: set tls.cert, tls.key, tls.client_ca and tls.client_crl "
            "(`ca-daemon mtls init` makes all four), or set server.dev_mode = true for plaintext gRPC on loopback"
        )
    if server.dev_mode and tls.enabled:
        raise ConfigError("server.dev_mode = true serves plaintext gRPC; remove [tls] cert/key or set server.dev_mode = false")
    if not tls.enabled and (why := _not_loopback(host)):
        raise ConfigError(
            f"server.listen = {server.listen!r} {why}; without TLS (development mode) gRPC is plaintext, so it may "
            "only bind 127.0.0.0/8, ::1 or a name that resolves to them alone (localhost); configure [tls] to serve other addresses"
        )

    hsm_raw = reader.table("hsm")
    pin_file = hsm_raw.string("pin_file", "")
    pin_env = hsm_raw.string("pin_env", "")
    if bool(pin_file) == bool(pin_env):
        raise ConfigError("hsm: set exactly one of pin_file or pin_env (the PIN itself never goes in the file)")
    if pin_env and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", pin_env):
        # Not echoed: what is in its place is most likely the PIN itself, which never goes in a log.
        raise ConfigError(
            "hsm.pin_env must be the name of an environment variable (letters, digits and _, not starting with a digit), "
            "not the PIN: the PIN itself never goes in the file"
        )
    softhsm2_conf = hsm_raw.string("softhsm2_conf", "")
    ca_raw = reader.table("ca")
    key_uri = ca_raw.string("key", "")
    if not key_uri.startswith("pkcs11:"):
        raise ConfigError("ca.key must be an RFC 7512 pkcs11: URI naming the CA key, e.g. pkcs11:token=ca;object=ca-1")
    token = hsm_raw.string("token", "") or _uri_token(key_uri)
    token_origin = f"hsm.token = {token!r}" + ("" if hsm_raw.string("token", "") else " (unset: the token of ca.key)")
    key_uri = _key_in_token("ca.key", key_uri, token, token_origin)
    module = hsm_raw.string("module", DEFAULT_SOFTHSM_MODULE)
    if not module.strip():
        raise ConfigError(f"hsm.module is empty: name the PKCS#11 library (.so) of your HSM, e.g. {DEFAULT_SOFTHSM_MODULE} for SoftHSM")
    hsm = HsmConfig(
        module=module,
        # A path starting with $VARIABLE (e.g. $CREDENTIALS_DIRECTORY/user.pin) is expanded when the PIN is read.
        pin=SecretSource(file=_pin_path(base, pin_file), env=pin_env),
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
        if not re.fullmatch(r"https?://\S+", url):  # fullmatch: "$" let a trailing newline through
            raise ConfigError(f"ca: {url!r} is not an http:// or https:// URL")
    for url in ca.crl_distribution_points:
        _check_served_url("ca.crl_distribution_points", url)
    for url in ca.ca_issuers_urls:
        _check_served_url("ca.ca_issuers_urls", url)

    store_raw = reader.table("store")
    url = store_raw.string("url", "")
    if url.startswith("sqlite:///"):
        db_path = url[len("sqlite:///") :]
        if not db_path or db_path.endswith("/") or _resolve(base, db_path).is_dir():
            # Else SQLite's own "unable to open database file" at start, naming neither the setting nor the cause.
            raise ConfigError(f"store.url {url!r} names a directory, not a database file: give the file, e.g. sqlite:///ca.db")
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
        commit_linger_ms=store_raw.integer("commit_linger_ms", 5, minimum=0, maximum=100),
    )

    profiles: dict[str, ProfileConfig] = {}
    profiles_raw = reader.table("profiles")
    for name in profiles_raw.keys():  # noqa: SIM118 - _Reader is not a dict
        profiles[name] = _parse_profile(name, profiles_raw.table(name))
    if not profiles:
        profiles["device"] = ProfileConfig(name="device", description="Device identity certificate (clientAuth)")
    default_profile = reader.string("default_profile", "device")
    if default_profile not in profiles:
        raise ConfigError(f"default_profile {default_profile!r} is not one of the profiles: {sorted(profiles)}")
    callers, caller_quotas = _parse_callers(reader.table("callers"), profiles, server.local_identity)
    roles = _parse_roles(reader.table("roles"))
    audit = _parse_audit(reader.table("audit"), token, token_origin, server.dev_mode)
    metrics = MetricsConfig(listen=reader.table("metrics").string("listen", ""))
    if metrics.listen:
        metrics_host = _host_of(metrics.listen, "metrics.listen")
        if not tls.enabled and (why := _not_loopback(metrics_host)):
            raise ConfigError(
                f"metrics.listen = {metrics.listen!r} {why}; without TLS (development mode) the metrics endpoint is "
                "plaintext, so it may only bind loopback (127.0.0.0/8, ::1, or a name that resolves to them alone); "
                "with [tls] it is served over mTLS"
            )
    _refuse_shared_ports((("server.listen", server.listen), ("server.http_listen", server.http_listen), ("metrics.listen", metrics.listen)))
    tls_ca_key = _key_in_token("tls.ca_key", tls.ca_key_uri, token, token_origin) if tls.ca_key_uri else ""
    tls = TlsConfig(**{**tls.__dict__, "ca_key_uri": tls_ca_key or _default_key_uri(token, "mtls-ca-1")})
    _refuse_shared_keys((("ca.key", ca.key_uri), ("audit.key", audit.key_uri), ("tls.ca_key", tls.ca_key_uri)))
    lint_mode = reader.table("lint").string("mode", "template")
    if lint_mode not in LINT_MODES:
        raise ConfigError(f"lint.mode = {lint_mode!r}: use one of {', '.join(LINT_MODES)}")
    config = Config(
        path=path,
        state_dir=state_dir,
        server=server,
        hsm=hsm,
        ca=ca,
        store=store,
        profiles=profiles,
        default_profile=default_profile,
        callers=callers,
        caller_quotas=caller_quotas,
        lint=LintConfig(mode=lint_mode),
        crl=_parse_crl(reader.table("crl"), base, state_dir, ca),
        tls=tls,
        roles=roles,
        audit=audit,
        metrics=metrics,
        rotation=_parse_rotation(reader.table("rotation")),
    )
    reader.refuse_unknown()  # after every section is read: the keys read are the keys known
    return config


def _parse_tls(raw: _Reader, base: Path) -> TlsConfig:
    """`[tls]`: all of cert, key, client_ca and client_crl, or none of them."""
    names = ("cert", "key", "client_ca", "client_crl")
    values = {name: raw.string(name, "") for name in names}
    given = [name for name in names if values[name]]
    if given and len(given) != len(names):
        missing = ", ".join(f"tls.{n}" for n in names if not values[n])
        raise ConfigError(f"[tls] is incomplete: set {missing} too (server certificate, its key, the client CAs and their CRL)")
    ca_key = raw.string("ca_key", "")
    if ca_key and not ca_key.startswith("pkcs11:"):
        raise ConfigError("tls.ca_key must be a pkcs11: URI naming the internal mTLS CA key in the HSM")

    refresh_days = raw.integer("client_crl_refresh_days", 30, minimum=0, maximum=80)

    def path(name: str) -> Path | None:
        return _resolve(base, values[name]) if values[name] else None

    return TlsConfig(path("cert"), path("key"), path("client_ca"), path("client_crl"), timedelta(days=refresh_days), ca_key_uri=ca_key)


def _parse_roles(raw: _Reader) -> tuple[RoleGrant, ...]:
    """`[roles]`: role -> list of "IDENTITY", "uri:REGEX" (SAN URI) or "ou:REGEX" (subject OU)."""
    grants: list[RoleGrant] = []
    for role in raw.keys():  # noqa: SIM118 - _Reader is not a dict
        if role not in ROLES:
            raise ConfigError(f"roles.{role}: unknown role; use one of {', '.join(ROLES)}")
        for entry in raw.string_list(role, []):
            kind, sep, value = entry.partition(":")
            if sep and kind in ("uri", "ou"):
                _check_regex(value, f"roles.{role} entry {entry!r}")
                grants.append(RoleGrant(role, kind, value))
            elif not entry:
                raise ConfigError(f"roles.{role}: an empty identity matches nobody")
            else:
                grants.append(RoleGrant(role, "identity", entry))
    return tuple(grants)


def _parse_audit(raw: _Reader, token: str, token_origin: str, dev_mode: bool) -> AuditConfig:
    key = raw.string("key", "") or _default_key_uri(token, "audit-1")
    if not key.startswith("pkcs11:"):
        raise ConfigError("audit.key must be a pkcs11: URI naming the audit checkpoint key in the HSM")
    key = _key_in_token("audit.key", key, token, token_origin)
    chain = raw.boolean("chain", True)
    if not chain and not dev_mode:
        raise ConfigError("audit.chain = false is for benchmarks in development mode only")
    interval = raw.integer("checkpoint_interval_seconds", 300, minimum=1, maximum=7 * 86400)
    return AuditConfig(key_uri=key, checkpoint_interval=timedelta(seconds=interval), chain=chain)


def _parse_rotation(raw: _Reader) -> RotationConfig:
    day = 86400
    return RotationConfig(
        approval_window=timedelta(seconds=raw.integer("approval_window_seconds", day, minimum=10, maximum=30 * day)),
        prepublication=timedelta(seconds=raw.integer("prepublication_seconds", 7 * day, minimum=0, maximum=366 * day)),
        poll_interval=timedelta(milliseconds=raw.integer("poll_interval_ms", 1000, minimum=50, maximum=60_000)),
    )


def _parse_profile(name: str, p: _Reader) -> ProfileConfig:
    """One `[profiles.NAME]` table, with every pattern compiled and every name checked."""
    where = f"profiles.{name}"
    if name == LINK_PROFILE:
        # The store tells a CA link certificate from a device's by this profile name: a device profile of that name
        # would make its certificates count as links (officer-only Revoke, not counted as leaves at a key's retirement).
        raise ConfigError(
            f"[{where}]: the profile name {LINK_PROFILE!r} is reserved for the CA link certificates a root roll-over "
            "makes; give the profile another name"
        )
    pattern = p.string("device_id_pattern", DEFAULT_DEVICE_ID_PATTERN)
    _check_regex(pattern, f"{where}.device_id_pattern")
    validity = timedelta(days=p.integer("validity_days", 365, minimum=1, maximum=36500))
    # validity_seconds (when set) overrides validity_days: short-lived certificates and tests of expiry.
    validity_seconds = p.integer("validity_seconds", 0, minimum=0, maximum=36500 * 86400)
    if validity_seconds:
        validity = timedelta(seconds=validity_seconds)
    # The default maximum is whole days: at least the validity, rounded up (validity_seconds may not be whole days).
    whole_days = -(-validity // timedelta(days=1))
    max_validity = timedelta(days=p.integer("max_validity_days", max(whole_days, 365 * 3), minimum=1, maximum=36500))
    if validity > max_validity:
        setting = f"validity_seconds ({validity_seconds})" if validity_seconds else f"validity_days ({validity.days})"
        raise ConfigError(f"{where}: {setting} exceeds max_validity_days ({max_validity.days})")
    curves = tuple(p.string_list("ec_curves", ["P-256", "P-384"]))
    _check_names(curves, EC_CURVES, f"{where}.ec_curves")
    rsa_min = p.integer("rsa_min_bits", 2048, minimum=2048, maximum=16384)
    rsa_max = p.integer("rsa_max_bits", 8192, minimum=0, maximum=16384)
    if rsa_max and rsa_max < rsa_min:
        raise ConfigError(f"{where}: rsa_max_bits is below rsa_min_bits (set rsa_max_bits = 0 to refuse RSA keys)")
    algorithms = tuple(p.string_list("csr_signature_algorithms", list(CSR_SIGNATURE_ALGORITHMS)))
    for algorithm in algorithms:
        if algorithm in WEAK_CSR_SIGNATURE_ALGORITHMS:
            raise ConfigError(f"{where}.csr_signature_algorithms: {algorithm} is never allowed (SHA-1 and MD5 are broken)")
    _check_names(algorithms, CSR_SIGNATURE_ALGORITHMS, f"{where}.csr_signature_algorithms")
    required = tuple(p.string_list("subject_required", ["CN"]))
    _check_names(required, SUBJECT_ATTRIBUTES, f"{where}.subject_required")
    allowed_raw = p.table("subject_allowed")
    subject_allowed: list[tuple[str, str]] = []
    for attribute in allowed_raw.keys():  # noqa: SIM118 - _Reader is not a dict
        if attribute == "CN":
            raise ConfigError(f"{where}.subject_allowed.CN: the CN is the device ID; set its pattern with device_id_pattern")
        _check_names((attribute,), SUBJECT_ATTRIBUTES, f"{where}.subject_allowed")
        regex = allowed_raw.string(attribute, "")
        _check_regex(regex, f"{where}.subject_allowed.{attribute}")
        subject_allowed.append((attribute, regex))
    for attribute in required:
        if attribute != "CN" and attribute not in dict(subject_allowed):
            raise ConfigError(f"{where}.subject_required names {attribute}, which subject_allowed does not allow")
    san_raw = p.table("san_allowed")
    san_allowed: list[tuple[str, str]] = []
    for kind in san_raw.keys():  # noqa: SIM118 - _Reader is not a dict
        _check_names((kind,), SAN_TYPES, f"{where}.san_allowed")
        regex = san_raw.string(kind, "")
        _check_regex(regex.replace(DEVICE_ID_PLACEHOLDER, "device"), f"{where}.san_allowed.{kind}")
        san_allowed.append((kind, regex))
    templates = tuple(p.string_list("san_templates", []))
    for template in templates:
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*:[!-~]+", template.replace(DEVICE_ID_PLACEHOLDER, "device")):
            raise ConfigError(
                f"{where}.san_templates: {template!r} is not a URI (templates make URI SANs such as urn:dev:ops:{{device_id}})"
            )
    extensions = p.string("requested_extensions", "drop")
    if extensions not in ("drop", "refuse"):
        raise ConfigError(f'{where}.requested_extensions must be "drop" or "refuse"')
    key_usage = tuple(p.string_list("key_usage", ["digitalSignature"]))
    if not key_usage:
        raise ConfigError(f"{where}.key_usage must name at least one usage")
    _check_names(key_usage, LEAF_KEY_USAGES, f"{where}.key_usage (keyCertSign and cRLSign are for CAs only)")
    ed25519 = p.boolean("ed25519", True)
    listed_curves = ", ".join(f'"{curve}"' for curve in curves)  # names checked above
    settings = {"EC": ("ec_curves", f"[{listed_curves}]"), "RSA": ("rsa_max_bits", str(rsa_max)), "Ed25519": ("ed25519", "true")}
    allowed = {"EC": bool(curves), "RSA": bool(rsa_max), "Ed25519": ed25519}
    written = set(p.keys())
    key_types = {
        kind: f"{key} = {value}" + ("" if key in written else ", the default") for kind, (key, value) in settings.items() if allowed[kind]
    }
    _check_key_usages_fit_key_types(where, key_usage, key_types)
    eku = tuple(p.string_list("extended_key_usage", ["clientAuth"]))
    if not eku:  # with the lint off, every certificate got an empty extendedKeyUsage, which no parser accepts
        raise ConfigError(f"{where}.extended_key_usage must name at least one usage (RFC 5280: an extendedKeyUsage holds one or more)")
    for usage in eku:
        if usage not in EXTENDED_KEY_USAGES and not re.fullmatch(r"[0-2](\.[0-9]+)+", usage):
            raise ConfigError(f"{where}.extended_key_usage: {usage!r} is neither one of {', '.join(EXTENDED_KEY_USAGES)} nor a dotted OID")
    return ProfileConfig(
        name=name,
        description=p.string("description", ""),
        device_id_pattern=pattern,
        validity=validity,
        max_validity=max_validity,
        ec_curves=curves,
        rsa_min_bits=rsa_min,
        rsa_max_bits=rsa_max,
        ed25519=ed25519,
        csr_signature_algorithms=algorithms,
        subject_required=required,
        subject_allowed=tuple(subject_allowed),
        subject_max_length=p.integer("subject_max_length", 64, minimum=1, maximum=1024),
        san_allowed=tuple(san_allowed),
        san_templates=templates,
        requested_extensions=extensions,
        key_usage=key_usage,
        extended_key_usage=eku,
        allow_reissue=p.boolean("allow_reissue", False),
    )


# The setting that takes each key type out of a profile.
_KEY_TYPE_OFF = {"EC": "ec_curves = []", "RSA": "rsa_max_bits = 0", "Ed25519": "ed25519 = false"}


def _check_key_usages_fit_key_types(where: str, key_usage: tuple[str, ...], key_types: dict[str, str]) -> None:
    """ConfigError if a usage of key_usage is prohibited for a key type the profile allows (KEY_USAGES_OF_KEY_TYPE).

    key_types: the key types the profile allows, each with the setting that allows it. Every certificate of the profile
    carries the same key usages, so each must suit every key type it allows: with the lint on, every Sign for a key
    of the other type was refused ('pkix.key_usage_value_prohibited_for_rsa'), and with the lint off it was issued
    with a usage its key cannot have, which relying parties that check the key usage against the key refuse.
    """
    for usage in key_usage:
        unfit = [kind for kind in key_types if usage not in KEY_USAGES_OF_KEY_TYPE[kind][0]]
        if not unfit:
            continue
        fit = [kind for kind in key_types if kind not in unfit]
        rfcs = ", ".join(f"{kind}: {KEY_USAGES_OF_KEY_TYPE[kind][1]}" for kind in unfit)
        if fit:
            advice = (
                f"remove {usage} from key_usage, or split the profile by key type: one profile for {' and '.join(fit)} keys "
                f"with {usage} ({', '.join(_KEY_TYPE_OFF[k] for k in unfit)}), another for {' and '.join(unfit)} keys "
                f"without it ({', '.join(_KEY_TYPE_OFF[k] for k in fit)})"
            )
        else:
            suited = [kind for kind, (usages, _) in KEY_USAGES_OF_KEY_TYPE.items() if usage in usages]
            advice = f"remove {usage} from key_usage (a usage only {' and '.join(suited)} keys may have: give those a profile of their own)"
        raise ConfigError(
            f"{where}.key_usage: {usage} is prohibited for {' and '.join(unfit)} keys ({rfcs}), and the profile allows them "
            f"({'; '.join(key_types[k] for k in unfit)}): a certificate for such a key would carry a key usage its key "
            f'cannot have, refused by the pre-issuance lint at every Sign, or issued broken with [lint] mode = "off". '
            f"Each usage of key_usage goes into the certificates of every key type the profile allows: {advice}"
        )


def _parse_callers(
    raw: _Reader, profiles: dict[str, ProfileConfig], local_identity: str
) -> tuple[dict[str, tuple[str, ...]], dict[str, int]]:
    """`[callers."IDENTITY"]`: `profiles = [...]` and `max_certificates_per_hour`; (profiles, quotas).

    Without the table the local identity may use every profile, without a quota.
    """
    if not raw.keys():
        return {local_identity: tuple(sorted(profiles))}, {}
    callers: dict[str, tuple[str, ...]] = {}
    quotas: dict[str, int] = {}
    for identity in raw.keys():  # noqa: SIM118 - _Reader is not a dict
        table = raw.table(identity)
        allowed = tuple(table.string_list("profiles", []))
        _check_names(allowed, tuple(profiles), f"callers.{identity}.profiles")
        callers[identity] = allowed
        quota = table.integer("max_certificates_per_hour", 0, minimum=0, maximum=10_000_000)
        if quota:
            quotas[identity] = quota
    return callers, quotas


def _check_regex(pattern: str, setting: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"{setting} is not a valid regular expression: {exc}") from None


def _check_names(values: tuple[str, ...], known: tuple[str, ...], setting: str) -> None:
    for value in values:
        if value not in known:
            raise ConfigError(f"{setting}: unknown name {value!r}; use one of {', '.join(known)}")


def _parse_crl(raw: _Reader, base: Path, state_dir: Path, ca: CaConfig) -> CrlConfig:
    """`[crl]`, with every interval checked against its validity."""
    day = 86400
    crl = CrlConfig(
        full_interval=timedelta(seconds=raw.integer("full_interval_seconds", day, minimum=60, maximum=366 * day)),
        full_validity=timedelta(seconds=raw.integer("full_validity_seconds", 7 * day, minimum=120, maximum=366 * day)),
        delta=raw.boolean("delta", True),
        delta_interval=timedelta(seconds=raw.integer("delta_interval_seconds", 300, minimum=1, maximum=31 * day)),
        delta_validity=timedelta(seconds=raw.integer("delta_validity_seconds", 3600, minimum=2, maximum=366 * day)),
        publish_on_revoke=raw.boolean("publish_on_revoke", True),
        check_interval=timedelta(milliseconds=raw.integer("check_interval_ms", 1000, minimum=50, maximum=60_000)),
        directory=_resolve(base, raw.string("directory", "")) if raw.string("directory", "") else state_dir / "crl",
        delta_distribution_points=tuple(raw.string_list("delta_distribution_points", [_delta_url(u) for u in ca.crl_distribution_points])),
    )
    if crl.directory is not None:  # the daemon creates it if missing; a file in its place stopped the CRL worker with a traceback
        existing = next(p for p in (crl.directory, *crl.directory.parents) if p.exists())
        if not existing.is_dir():
            raise ConfigError(f"crl.directory = {str(crl.directory)!r}: {existing} is not a directory; name a directory for the CRL files")
    if crl.full_validity <= crl.full_interval:
        raise ConfigError("crl.full_validity_seconds must exceed crl.full_interval_seconds, or relying parties see gaps")
    if crl.delta:
        if crl.delta_validity <= crl.delta_interval:
            raise ConfigError("crl.delta_validity_seconds must exceed crl.delta_interval_seconds, or relying parties see gaps")
        if crl.delta_interval >= crl.full_interval:
            raise ConfigError("crl.delta_interval_seconds must be shorter than crl.full_interval_seconds")
    for url in crl.delta_distribution_points:
        if not re.fullmatch(r"https?://\S+", url):  # fullmatch: "$" let a trailing newline through
            raise ConfigError(f"crl.delta_distribution_points: {url!r} is not an http:// or https:// URL")
        _check_served_url("crl.delta_distribution_points", url)
    if crl.delta:
        _refuse_delta_at_full_path(crl, ca)
    return crl


def _check_served_url(setting: str, url: str) -> None:
    """Refuse a URL whose path the HTTP server answers 400, or that a client never sends whole: nothing could fetch it.

    The server serves each configured URL at its path and routes a request by its decoded path, refusing dot-segments,
    encoded slashes and NUL, bad escapes and the like (http_paths): a certificate must not point where it refuses.
    """
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unclosed IPv6 bracket: the URL had failed only when a CRL was served
        raise ConfigError(f"{setting}: {url!r} is not a valid URL") from None
    if "#" in url:  # the full and the default delta URL (x#1.crl, x#1-delta.crl) were served at one path
        reason = f"a fragment (#{parts.fragment}) is never sent to the server; write a # in a path as %23"
    else:
        try:
            request_path((parts.path or "/") + (f"?{parts.query}" if parts.query else ""))
            return
        except ValueError as exc:
            reason = str(exc)
    raise ConfigError(f"{setting}: {url!r} cannot be served over HTTP: {reason}")


def _delta_url(full_url: str) -> str:
    """Where the delta of a CRL published at full_url goes: its path "x.crl" -> "x-delta.crl", the query kept.

    The server routes by path and ignores the query, so the delta's URL must differ from the full CRL's in its path:
    "x.crl?v=1" made "x.crl?v=1-delta", served at the full CRL's path, and each delta replaced the full CRL there.
    """
    parts = urlsplit(full_url)
    path = parts.path or "/"
    if path.endswith(".crl"):
        path = path[: -len(".crl")] + "-delta.crl"
    elif path.endswith("/"):  # "https://crl.example.net" made "https://crl.example.net-delta": another host
        path += "delta.crl"
    else:
        path += "-delta"
    return urlunsplit(parts._replace(path=path))


def _refuse_delta_at_full_path(crl: CrlConfig, ca: CaConfig) -> None:
    """A delta URL whose path is a full CRL URL's: the server routes by the (decoded) path alone, so the delta replaced
    the full CRL there and relying parties reading the CDP got a delta (OpenSSL takes it for a complete CRL)."""
    full = {request_path(urlsplit(url).path or "/"): url for url in ca.crl_distribution_points}
    for url in crl.delta_distribution_points:
        if (other := full.get(request_path(urlsplit(url).path or "/"))) is not None:
            raise ConfigError(
                f"crl.delta_distribution_points: {url!r} has the path of ca.crl_distribution_points {other!r}; the HTTP server "
                "routes by path (a query does not tell them apart), so the delta CRL would replace the full one there: "
                "give the delta URL another path"
            )


def _uri_token(uri: str) -> str:
    token = _uri_attributes(uri).get("token", "")
    if not token:
        raise ConfigError(f"ca.key {uri!r} must name its token (token=...), or set hsm.token")
    return token


def _uri_attributes(uri: str) -> dict[str, str]:
    """The path attributes of a `pkcs11:` URI, percent-decoded (hsm.Pkcs11Uri reads them at start; config may not import it)."""
    path = uri[len("pkcs11:") :].split("?", 1)[0]
    return {name: unquote(value) for name, _, value in (part.partition("=") for part in path.split(";") if part)}


def _default_key_uri(token: str, label: str) -> str:
    """pkcs11:token=...;object=label, the token label percent-encoded as RFC 7512 and hsm.Pkcs11Uri write it.

    Raw, a ';' or '?' in the token label ended the attribute early and a '%' read as an escape: the default audit and
    mTLS CA keys named another token, and the configuration was refused for a setting it did not contain.
    """
    return f"pkcs11:token={quote(token, safe='')};object={quote(label, safe='')}"


def _key_in_token(setting: str, uri: str, token: str, token_origin: str) -> str:
    """uri, in the token of hsm.token: the daemon opens that one token, so a key URI naming another is refused.

    A URI naming another token loaded, then start-up said the token was not found, or used the key of that label in
    hsm.token. One without token= (RFC 7512: any token) means hsm.token's and gets it here, since every reader of key
    URIs (hsm.Pkcs11Uri) needs it: it loaded, then `init` refused it and `serve` said the key was not in the token.
    A URI naming no key (no object= or id=) loaded too, and at start the same reader refused it without the setting.
    """
    attributes = _uri_attributes(uri)
    if not attributes.get("object") and not attributes.get("id"):
        raise ConfigError(f"{setting} = {uri!r} names no key: add object=LABEL or id=%01%02... (its CKA_ID, percent-encoded)")
    named = attributes.get("token")
    if named is None:
        return f"pkcs11:token={quote(token, safe='')};{uri[len('pkcs11:') :]}"
    if named != token:
        raise ConfigError(
            f"{setting} = {uri!r} names token {named!r}, but {token_origin}: the daemon opens that one token and finds "
            "every key in it, so name the same token in both (or leave token= out of the key URI)"
        )
    return uri


def _refuse_shared_ports(settings: tuple[tuple[str, str], ...]) -> None:
    """gRPC, CRL HTTP and metrics each need an address of their own, compared by what they bind, not by their text.

    gRPC binds with SO_REUSEPORT: an http_listen equal to server.listen was accepted, and either the CRL server
    retried its bind for ever or both listened on the port, each connection going to one of them at random.
    "localhost:8080" beside "127.0.0.1:8080", or "[0::0]:8080" beside anything on port 8080, got through too.
    The addresses are the ones _host_of validated, so the two never read HOST:PORT differently.
    """
    seen: list[tuple[str, str, str, int]] = []
    for setting, address in settings:
        if not address:
            continue
        host, port = _host_of(address, setting), int(address.rpartition(":")[2])
        for other, other_address, other_host, other_port in seen:
            if port == other_port and (why := _same_binding(host, other_host, port)):
                raise ConfigError(
                    f"{setting} = {address!r} takes the port of {other} = {other_address!r} ({why}); give each listener a port of its own"
                )
        seen.append((setting, address, host, port))


def _same_binding(host: str, other: str, port: int) -> str:
    """Why listeners on host and other, on one port, cannot both bind ("" if they can).

    A wildcard (empty host, 0.0.0.0, ::) takes the port on every address: :: too on IPv4 (Linux is dual-stack by
    default). A name is resolved; one that does not resolve is left to the bind error at start, not a load failure.
    """
    mine, theirs = _bound_addresses(host, port), _bound_addresses(other, port)
    if mine is None or theirs is None:
        return f"{(host if mine is None else other) or 'an empty host'} binds every address"
    common = mine & theirs
    return f"both bind {', '.join(sorted(common))}" if common else ""


def _bound_addresses(host: str, port: int) -> set[str] | None:
    """The addresses a listener on host binds, normalized; None for a wildcard; empty if the name does not resolve."""
    if not host:
        return None
    try:
        addresses = {ipaddress.ip_address(host)}
    except ValueError:
        try:
            found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICSERV)
        except (OSError, UnicodeError):
            return set()
        addresses = {ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in found}
    # An IPv4-mapped IPv6 address (::ffff:127.0.0.1) binds that IPv4 address: compared as text, the two never met.
    addresses = {a.ipv4_mapped if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped else a for a in addresses}
    if any(a.is_unspecified for a in addresses):
        return None
    return {str(a) for a in addresses}


def _refuse_shared_keys(settings: tuple[tuple[str, str], ...]) -> None:
    """Each HSM key has one job: the CA key, the audit checkpoint key and the internal mTLS CA key are different keys.

    An audit.key naming the CA key had init generate the audit key under the CA key's label, then refuse to make the
    CA key ('the token holds key ... but the store does not know it'); with a CA key already there, the CA key signed
    the audit checkpoints. A tls.ca_key naming it would make every device certificate an mTLS client certificate.
    """
    seen: dict[tuple[str, str, str], str] = {}
    for setting, uri in settings:
        attributes = _uri_attributes(uri)
        token = attributes.get("token", "")
        for kind in ("object", "id"):
            if value := attributes.get(kind, ""):
                other = seen.setdefault((token, kind, value), setting)
                if other != setting:
                    raise ConfigError(
                        f"{setting} names the same key as {other} ({kind}={value} in token {token!r}): each needs a key of its own, "
                        "so give one of them another label (audit.key defaults to object=audit-1, tls.ca_key to object=mtls-ca-1)"
                    )


def _pin_path(base: Path, value: str) -> Path | None:
    if not value:
        return None
    return Path(value) if value.startswith("$") else _resolve(base, value)


def _resolve(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p).resolve()


def _host_of(address: str, setting: str) -> str:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{setting} = {address!r} must be HOST:PORT")
    return host.strip("[]")


def _not_loopback(host: str) -> str | None:
    """None if every address host stands for is a loopback one (an IP address, or a name resolved now); else why not.

    gRPC binds every address a name resolves to; "localhost" was taken for loopback on its
    name alone, so an /etc/hosts (or DNS) that also maps it to a network address had the
    plaintext development server listening there. A name that does not resolve is refused.
    """
    try:
        return None if ipaddress.ip_address(host).is_loopback else "is not a loopback address"
    except ValueError:
        pass
    if not host:
        return "binds every interface"
    try:
        found = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        return f"names a host that does not resolve ({getattr(exc, 'strerror', None) or exc})"
    addresses = sorted({str(info[4][0]) for info in found})
    outside = [a for a in addresses if not _loopback_address(a)]
    if addresses and not outside:
        return None
    return f"is not a loopback address: {host} resolves to {', '.join(addresses) or 'nothing'}"


def _loopback_address(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


class _Reader:
    """Typed access to one TOML table that names the full setting in every error.

    Every key asked for, present or not, is remembered (with the reader of each sub-table), so
    once parsing is done `refuse_unknown` can name whatever the file holds that no code reads:
    the known keys are the keys the parse functions read, not a second list to keep in step.
    """

    def __init__(self, raw: dict[str, Any], prefix: str) -> None:
        self._raw = raw
        self._prefix = prefix
        self._read: set[str] = set()
        self._tables: dict[str, _Reader] = {}

    def _name(self, key: str) -> str:
        return f"{self._prefix}{key}"

    def _get(self, key: str, default: Any) -> Any:
        self._read.add(key)
        return self._raw.get(key, default)

    def keys(self) -> list[str]:
        return list(self._raw)

    def table(self, key: str) -> _Reader:
        value = self._get(key, {})
        if not isinstance(value, dict):
            raise ConfigError(f"{self._name(key)} must be a table")
        if key not in self._tables:
            self._tables[key] = _Reader(value, f"{self._name(key)}.")
        return self._tables[key]

    def refuse_unknown(self) -> None:
        """Raise ConfigError naming the keys of this table, then of its sub-tables, that were never read.

        A misspelled setting would otherwise be ignored silently and its default used.
        """
        unknown = [self._unknown(key) for key in self._raw if key not in self._read]
        if unknown:
            raise ConfigError("; ".join(unknown))
        for child in self._tables.values():
            child.refuse_unknown()

    def _unknown(self, key: str) -> str:
        """`unknown setting `server.workerz`; did you mean `server.workers`?` (or table [x])."""
        is_table = isinstance(self._raw[key], dict)

        def show(name: str) -> str:
            return f"[{self._name(name)}]" if is_table else f"`{self._name(name)}`"

        message = f"unknown {'table' if is_table else 'setting'} {show(key)}"
        close = difflib.get_close_matches(key, sorted(self._read), n=1)
        return f"{message}; did you mean {show(close[0])}?" if close else f'{message}; see README.md, "Configuration"'

    def string(self, key: str, default: str) -> str:
        value = self._get(key, default)
        if not isinstance(value, str):
            raise ConfigError(f"{self._name(key)} must be a string")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{self._name(key)} must be true or false")
        return value

    def integer(self, key: str, default: int, *, minimum: int, maximum: int) -> int:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{self._name(key)} must be an integer")
        if not minimum <= value <= maximum:
            raise ConfigError(f"{self._name(key)} = {value} is out of range [{minimum}, {maximum}]")
        return value

    def string_list(self, key: str, default: list[str]) -> list[str]:
        value = self._get(key, default)
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
# Plain HTTP for CRLs and the CA certificate at the URLs the certificates carry ([ca] below).
http_listen = "127.0.0.1:8080"

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

# Full (base) CRL every 24 h valid 7 days; delta CRL every 5 minutes valid 1 hour, and at once
# after a revocation. Published over HTTP (server.http_listen), GetCRL, and as files in `directory`.
[crl]
full_interval_seconds = 86400
full_validity_seconds = 604800
delta = true
delta_interval_seconds = 300
delta_validity_seconds = 3600
publish_on_revoke = true
directory = "crl"

# A profile is the issuance policy for one kind of certificate; `ca-daemon reload` (or SIGHUP)
# re-reads this section without a restart. See README.md ("Issuance policy"; every setting in "Configuration").
[profiles.device]
description = "Device identity certificate for TLS client authentication"
device_id_pattern = '{DEFAULT_DEVICE_ID_PATTERN}'
validity_days = 365
# max_validity_days defaults to the longer of validity_days and 3 years.
ec_curves = ["P-256", "P-384"]
rsa_min_bits = 2048
rsa_max_bits = 8192
ed25519 = true
subject_required = ["CN"]
# SANs every certificate gets, bound to the device ID, e.g. ["urn:dev:ops:{{device_id}}"]. (Note that
# pkilint's lint_pkix_cert flags URNs as invalid URIs; the daemon's own lint knows RFC 8141 URNs.)
san_templates = []
requested_extensions = "drop"
key_usage = ["digitalSignature"]
extended_key_usage = ["clientAuth"]
allow_reissue = false

[profiles.device.san_allowed]
uri = '^urn:dev:ops:{{device_id}}$'

# Which profiles each caller identity may ask for (in development mode: server.local_identity).
[callers."local-developer"]
profiles = ["device"]

[lint]
# "template": pkilint once per certificate shape, fast checks of what varies; "full": pkilint every certificate.
mode = "template"

# Hash-chained audit log: a checkpoint (chain head and event count) is signed with this HSM key
# every interval and at shutdown. `ca-daemon init` creates the key; `ca-daemon audit public-key`
# exports its public half for `ca-daemon audit verify`.
[audit]
key = "pkcs11:token={token};object=audit-1"
checkpoint_interval_seconds = 300

# Prometheus metrics endpoint (empty: off), e.g. "127.0.0.1:9464". See README.md ("Logs and metrics").
[metrics]
listen = ""

# CA key rotation (README.md, "Key rotation"): two distinct officers must approve activation,
# retirement and destruction of a CA key within the window; a new key is published this long
# before it may be activated.
[rotation]
approval_window_seconds = 86400
prepublication_seconds = 604800

# Outside development mode: mTLS ([tls]) and roles ([roles]); `ca-daemon mtls init` writes both.
# See README.md ("mTLS and roles"). In development mode server.local_identity has every role.
"""


__all__ = ["Config", "KeySpec", "load", "parse", "default_dev_config"]
