"""`ca-daemon check-config`: validate a configuration and reach its token and database, serving nothing.

Each check prints one line, "ok" or "FAIL", with what was checked and, on failure, what
to do; "WARN" marks a finding that fails nothing (a database file other users can read).
A check that depends on an earlier one (the CA key needs the token) is skipped when that
one failed. The exit code is 0 only when every check passed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy.engine import make_url

from ca_daemon import app, tls
from ca_daemon import config as config_module
from ca_daemon.authority import check_key_urls, check_policy, key_urls_advice, leaf_urls, load_active_ca, unnamed_key_urls
from ca_daemon.config import Config
from ca_daemon.errors import CaError
from ca_daemon.hsm import Hsm, Pkcs11Uri
from ca_daemon.store import SqlStore, open_store, schema, sqlite_mode_warning


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    # A finding that does not fail the check (exit code 0): printed WARN.
    warning: bool = False

    def line(self) -> str:
        return f"{'FAIL' if not self.ok else 'WARN' if self.warning else 'ok  '}  {self.name}: {self.detail}"


def run(config_path: str | Path, emit: Callable[[Check], None] = lambda _c: None) -> list[Check]:
    """Run every check in order, handing each result to emit as soon as it is known."""
    results: list[Check] = []

    def record(name: str, ok: bool, detail: str) -> bool:
        results.append(Check(name, ok, detail))
        emit(results[-1])
        return ok

    try:
        config = config_module.load(config_path)
    except CaError as exc:
        record("configuration", False, exc.message)
        return results
    record("configuration", True, f"{config.path}: {len(config.profiles)} profile(s), {config.server.workers} worker(s)")
    if shared := unnamed_key_urls(config):  # one key works with them; a second would share them (rotation refused)
        detail = (
            "another CA key would get the configured key's URLs, so creating one (`ca-daemon key generate`, the key "
            f"ceremony's GenerateKey: rotation) is refused until they name the key: {key_urls_advice(config, shared)}"
        )
        results.append(Check("CRL and CA URLs", True, detail, warning=True))
        emit(results[-1])
    _check_files(config, record)
    store = _check_store(config, record)
    if warning := sqlite_mode_warning(config.store.url):
        results.append(Check("database file", True, warning, warning=True))
        emit(results[-1])
    hsm = _check_token(config, record)
    try:
        if hsm is not None and store is not None:
            try:
                active = load_active_ca(config, hsm, store)
                subject = active.certificate.subject.rfc4514_string()
                record("CA key", True, f"{active.key.key_id} in the token matches its certificate {subject}")
            except CaError as exc:
                record("CA key", False, exc.message)
            else:  # what start-up and a reload check of the profiles against that key's certificate and chain
                try:
                    check_policy(config, store)
                    linted = "is not linted ([lint] mode = off)" if config.lint.mode == "off" else "passes the lint"
                    record("profiles", True, f"each profile's template {linted} and fits the CA key's chain")
                except CaError as exc:
                    record("profiles", False, exc.message)
                try:  # the URLs its certificates will carry, against those earlier certificates carry
                    check_key_urls(store, active.key.key_id, leaf_urls(config, active.key.key_id))
                    served = len({url for _, _, url in store.key_urls()})
                    detail = f"the CA key's URLs take no path that certificates already carry ({served} recorded URL(s), all served)"
                    record("served URLs", True, detail)
                except CaError as exc:
                    record("served URLs", False, exc.message)
    finally:
        if hsm is not None:
            hsm.close()
        if store is not None:
            store.close()
    return results


def _check_files(config: Config, record: Callable[[str, bool, str], bool]) -> None:
    module = Path(config.hsm.module)
    record("PKCS#11 module", module.is_file(), str(module) if module.is_file() else f"{module} does not exist")
    try:
        config.hsm.pin.read()
        record("PIN", True, f"readable from {config.hsm.pin.describe()}")
    except CaError as exc:
        record("PIN", False, exc.message)
    tls = config.tls
    if tls.enabled:
        for name, path in (
            ("cert", tls.cert_file),
            ("key", tls.key_file),
            ("client_ca", tls.client_ca_file),
            ("client_crl", tls.client_crl_file),
        ):
            readable = path is not None and path.is_file()
            record(f"tls.{name}", readable, str(path) if readable else f"{path} is missing (`ca-daemon mtls init` makes it)")
        _check_tls_credentials(config, record)
    else:
        record("tls", True, "off: development mode, plaintext gRPC on loopback")


def _check_tls_credentials(config: Config, record: Callable[[str, bool, str], bool]) -> None:
    """What the daemon will load: certificate and key pair, client CA bundle and CRL; and how long the certificate lasts."""
    try:
        app.check_tls_files(config)
    except CaError as exc:
        record("TLS credentials", False, exc.message)
        return
    assert config.tls.cert_file is not None
    not_after = tls.server_certificate_expiry(config.tls.cert_file)
    left = (not_after - datetime.now(UTC)).days if not_after is not None else 0
    renew = "; renew it soon: `ca-daemon mtls renew-server --reload`" if left < 30 else ""
    record("TLS credentials", True, f"server certificate and key load, valid until {not_after} ({left} days){renew}")


def _check_store(config: Config, record: Callable[[str, bool, str], bool]) -> SqlStore | None:
    shown = make_url(config.store.url).render_as_string(hide_password=True)
    store = open_store(config.store.url, sqlite_synchronous=config.store.sqlite_synchronous, migrate=False)
    try:
        version = store.schema_version()
    except CaError as exc:
        store.close()
        record("database", False, f"{shown}: {exc.message}")
        return None
    except Exception as exc:  # a fresh database has no schema_migrations table yet
        text = str(getattr(exc, "orig", exc)).splitlines()[0][:200]
        if "schema_migrations" not in text:
            store.close()
            record("database", False, f"{shown}: {text}")
            return None
        version = 0
    if (reason := schema.unknown_version_reason(version)) is not None:
        record("database", False, f"{shown}: {reason}")
        store.close()
        return None
    if version < schema.LATEST_VERSION:
        needed = schema.LATEST_VERSION
        record("database", False, f"{shown}: schema version {version}, this release needs {needed}; run `ca-daemon db migrate`")
        store.close()
        return None
    replicas = "replicas may share it" if store.dialect == "postgresql" else "one daemon only; replicas need postgresql://"
    record("database", True, f"{shown}: reachable, schema version {version}, {store.dialect} ({replicas})")
    return store


def _check_token(config: Config, record: Callable[[str, bool, str], bool]) -> Hsm | None:
    try:
        hsm = app.connect_hsm(config)
    except CaError as exc:
        record("token", False, exc.message)
        return None
    try:
        Pkcs11Uri.parse(config.ca.key_uri)  # the active CA key, whichever it is since a rotation, has its own line
        record("token", True, f"{config.hsm.token!r} via {config.hsm.module}: logged in")
    except CaError as exc:
        with contextlib.suppress(CaError):
            hsm.close()
        record("token", False, exc.message)
        return None
    return hsm


__all__ = ["Check", "run"]
