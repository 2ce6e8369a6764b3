"""`ca-daemon` command line: init, serve, key, ca, client, db.

PINs are never accepted as arguments: they come from the files or environment variables
the configuration names.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
from cryptography import x509

from ca_daemon import app, authority, cli_access, cli_factory, cli_rotation, cli_store, issuer
from ca_daemon import config as config_module
from ca_daemon.errors import CaError, FailedPrecondition
from ca_daemon.hsm import Pkcs11Uri
from ca_daemon.model import CaKey, KeySpec, KeyStatus
from ca_daemon.rotation import MAX_ROOT_VALIDITY_DAYS
from ca_daemon.store import SqlStore, open_store
from ca_daemon.store.rotation_store import RotationStore

DEFAULT_CONFIG = "state/ca-daemon.toml"
KEY_TYPES_HELP = (
    "ec-p256 (default), ec-p384, rsa-2048, rsa-3072, rsa-4096, ed25519. Ed25519 needs a token that offers "
    "CKM_EC_EDWARDS_KEY_PAIR_GEN and CKM_EDDSA (SoftHSM 2.6 with OpenSSL 1.1.1+ does); the command refuses "
    "a type the token lacks"
)
DEV_TOKEN = "ca-daemon"  # noqa: S105 (a token label, not a secret)
DEV_KEY_LABEL = "ca-root-1"


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return 2
    try:
        if getattr(args, "target", None) == "":  # a command that talks to the daemon, without --target
            args.target = daemon_target(args.config)
        result: int = args.handler(args)
        return result
    except CaError as exc:
        print(f"ca-daemon: {exc.message}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as exc:
        print(f"ca-daemon: {exc}", file=sys.stderr)
        return 1
    except grpc.RpcError as exc:
        target = getattr(args, "target", "") or "the daemon"
        if exc.code() == grpc.StatusCode.UNAVAILABLE and (why := cli_factory.unreachable(target, exc.details() or "")):
            print(f"ca-daemon: {why}", file=sys.stderr)
            return 1
        hint = ""
        if exc.code() == grpc.StatusCode.UNAVAILABLE and hasattr(args, "tls_ca") and not args.tls_ca:
            # A plaintext client meets an mTLS daemon as a closed socket; only the daemon's log says why.
            hint = "; if the daemon serves mTLS (server.dev_mode = false), pass --tls-ca, --tls-cert and --tls-key"
        elif exc.code() == grpc.StatusCode.UNAVAILABLE and "Hostname Verification Check failed" in (exc.details() or ""):
            # The client's own check: the daemon's certificate does not name the host dialled (e.g. the
            # default target, server.listen, is 0.0.0.0:50051; or a replica reached by an address).
            hint = (
                f"; the daemon's TLS certificate does not name the host of the target ({target}): give --target a name it has "
                "(a --host of `ca-daemon mtls init`), or --tls-server-name with one"
            )
        elif exc.code() == grpc.StatusCode.UNAVAILABLE and any(m in (exc.details() or "") for m in _CLOSED_IN_HANDSHAKE):
            # An mTLS daemon that refuses the client certificate closes the connection; gRPC says no more.
            hint = (
                "; the daemon closed the connection: if it happens again, the daemon refuses this client certificate "
                "(not issued by its client CA, or revoked: its log says which); ask an officer for one (`ca-daemon mtls issue`)"
            )
        print(f"ca-daemon: the daemon answered {exc.code().name}: {exc.details()}{hint}", file=sys.stderr)
        return 1


# How gRPC reports a connection the daemon closed during or right after the TLS handshake.
_CLOSED_IN_HANDSHAKE = ("Socket closed", "Connection reset by peer")

# What init creates when the configured CA key is new; ignored, and said so, when it exists.
_INIT_DEFAULTS: dict[str, str | int] = {"key_type": "ec-p256", "subject": "CN=ca-daemon development root CA", "validity_days": 3650}


def daemon_target(config: str) -> str:
    """Where a command that talks to the daemon (client, simulate-factory, key create/status/..., profiles list)
    dials when --target is not given: server.listen of the configuration, the address the daemon binds.

    A wildcard (0.0.0.0:50051) is dialled as it is: on Linux that reaches this host, and with mTLS the
    hostname check then fails with a hint to pass --tls-server-name (see main). Without a configuration
    file (a programming service on another host has none) it is DEFAULT_TARGET, but only when the
    default file is missing: a file named by --config or CA_DAEMON_CONFIG must be there, or a revocation
    meant for one daemon could reach another.
    """
    if config == DEFAULT_CONFIG and not Path(config).exists():
        return cli_factory.DEFAULT_TARGET
    return config_module.load(config).server.listen


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ca-daemon", description="A certificate authority whose keys live in a PKCS#11 HSM.")
    parser.add_argument("--config", default=os.environ.get("CA_DAEMON_CONFIG", DEFAULT_CONFIG), help="configuration file (TOML)")
    sub = parser.add_subparsers(metavar="COMMAND")

    p = sub.add_parser("init", help="create token, CA key, root certificate and database (reuses what exists)")
    p.add_argument("--dev", action="store_true", help="create a SoftHSM token, PIN files and a development configuration if missing")
    p.add_argument("--key-type", default=_INIT_DEFAULTS["key_type"], choices=[s.value for s in KeySpec], help=KEY_TYPES_HELP)
    p.add_argument("--subject", default=_INIT_DEFAULTS["subject"], help="subject of the CA certificate (RFC 4514)")
    p.add_argument(
        "--validity-days",
        type=cli_factory.whole_number(1, MAX_ROOT_VALIDITY_DAYS, " days"),
        default=_INIT_DEFAULTS["validity_days"],
        help=f"validity of the self-signed root certificate (default 3650 days, at most {MAX_ROOT_VALIDITY_DAYS})",
    )
    p.add_argument("--csr-out", help="instead of a self-signed root, write a CSR for a parent CA to this file")
    p.set_defaults(handler=_init)

    p = sub.add_parser("serve", help="serve gRPC until SIGTERM")
    p.set_defaults(handler=lambda a: app.serve(config_module.load(a.config)))

    key = sub.add_parser("key", help="CA keys in the HSM").add_subparsers(metavar="ACTION")
    p = key.add_parser("generate", help="generate a key pair inside the token (never exported)")
    p.add_argument("--type", default="ec-p256", choices=[s.value for s in KeySpec], help=KEY_TYPES_HELP)
    p.add_argument("--label", required=True, help="CKA_LABEL of the new key; also its key ID in the store")
    p.set_defaults(handler=_key_generate)
    p = key.add_parser("list", help="CA keys known to the store")
    p.set_defaults(handler=_key_list)
    cli_rotation.add_commands(key)

    ca = sub.add_parser("ca", help="CA certificates").add_subparsers(metavar="ACTION")
    p = ca.add_parser("csr", help="write a CSR (signed in the token) for a parent CA to certify a key")
    p.add_argument("--label", required=True, help="the key's CKA_LABEL, which is its key ID (`ca-daemon key list`)")
    p.add_argument("--subject", required=True, help="RFC 4514 subject, e.g. 'CN=Factory CA 1,O=Example'")
    p.add_argument("--out", required=True, help="where to write the CSR (PEM)")
    p.set_defaults(handler=_ca_csr)
    p = ca.add_parser("import-cert", help="install the parent-signed certificate of a key (checked against the token)")
    p.add_argument("--label", required=True, help="the key's CKA_LABEL (key ID): the certificate must carry its public key")
    p.add_argument("--cert", required=True, help="PEM file: the CA certificate, optionally followed by its parents")
    p.add_argument("--chain", help="PEM file with the parents, nearest first, up to the root")
    p.set_defaults(handler=_ca_import)
    p = ca.add_parser("export", help="write the active CA chain (PEM or DER)")
    p.add_argument("--out", required=True, help="where to write it")
    p.add_argument("--format", choices=["pem", "der"], default="pem", help="pem: the whole chain (default); der: the CA certificate alone")
    p.set_defaults(handler=_ca_export)

    p = sub.add_parser("reload", help="check the configuration, then have the running daemon re-read it (SIGHUP)")
    p.set_defaults(handler=_reload)
    profiles = sub.add_parser("profiles", help="certificate profiles").add_subparsers(metavar="ACTION")
    p = profiles.add_parser("list", help="the profiles in force in the running daemon (ListProfiles)")
    p.add_argument("--target", default="", help=cli_factory.TARGET_HELP)
    p.add_argument("--tls-ca", default="", help="CA bundle (PEM) of the daemon's server certificate; enables mTLS")
    p.add_argument("--tls-cert", default="", help="a client certificate (PEM) with role programmer, officer or admin")
    p.add_argument("--tls-key", default="", help="its private key (PEM)")
    p.add_argument("--tls-server-name", default="", help="name to check in the server certificate (default: the target host)")
    p.set_defaults(handler=_profiles_list)

    db = sub.add_parser("db", help="database").add_subparsers(metavar="ACTION")
    p = db.add_parser("migrate", help="apply schema migrations")
    p.set_defaults(handler=_db_migrate)
    cli_store.add_commands(db)

    p = sub.add_parser("check-config", help="validate the configuration and reach token and database, without serving")
    p.set_defaults(handler=_check_config)

    client = sub.add_parser("client", help="talk to a running daemon as a programming service").add_subparsers(metavar="ACTION")
    cli_factory.add_client_commands(client)
    cli_factory.add_commands(sub, ca)
    cli_access.add_commands(sub)
    return parser


# -- init ------------------------------------------------------------------


def _init(args: argparse.Namespace) -> int:
    path = Path(args.config)
    # Checked before anything is made: a bad --subject was refused only after the CA key was generated, which
    # stayed in the token and the store without a certificate (and --dev's token and files stayed too).
    subject = issuer.parse_subject(args.subject)
    if args.dev and not path.exists():
        write_dev_setup(path.parent, path)
    config = config_module.load(path)
    app.prepare_environment(config)
    spec = KeySpec(args.key_type)
    hsm = app.connect_hsm(config)
    store = app.connect_store(config)
    try:
        from ca_daemon import audit

        if audit.ensure_audit_key(hsm, store, config.audit.key_uri, "ca-daemon-cli"):
            print(f"generated the audit checkpoint key in the token: {config.audit.key_uri}")
        uri = Pkcs11Uri.parse(config.ca.key_uri)
        key_id = authority.key_id_for(uri)
        key = store.get_ca_key(key_id)
        if key is None:
            try:
                hsm.public_key_der(uri)
            except CaError:
                key = authority.create_ca_key(config, hsm, store, spec, uri.label or key_id)
                print(f"generated {spec.value} CA key in the token: {key.pkcs11_uri}")
            else:
                raise CaError(f"the token holds key {uri} but the store does not know it; import it with `ca-daemon key` tools")
        if key.certificate_der is not None:
            if args.csr_out:  # asked for a file it cannot have: a zero exit would let a script send on a stale or missing one
                raise CaError(
                    f"CA key {key.key_id} already has a certificate, so init wrote no CSR to {args.csr_out}; "
                    "`ca-daemon ca csr --label LABEL --subject SUBJECT --out FILE` writes one for a key in the token "
                    "(for a new key, `ca-daemon key generate` first)"
                )
            settled = key.status in (KeyStatus.ACTIVE, KeyStatus.PENDING)  # pending: made by init, active from the first start
            print(f"CA key {key.key_id} already has a certificate{'' if settled else f' (it is {key.status.value})'}; nothing to do")
            active = store.active_key_id()
            if active is not None and active != key.key_id:
                print(f"the active CA key is {active} (`ca-daemon key status` lists them all)")
            ignored = [f"--{name.replace('_', '-')}" for name, default in _INIT_DEFAULTS.items() if getattr(args, name) != default]
            if ignored:
                print(f"ignored {', '.join(ignored)}: they apply only when init creates the CA key and its certificate", file=sys.stderr)
            return 0
        if args.csr_out:
            Path(args.csr_out).write_bytes(authority.ca_csr(hsm, key, subject))
            print(f"wrote CSR for CA key {key.key_id} to {args.csr_out}; install the answer with `ca-daemon ca import-cert`")
            return 0
        installed = authority.self_sign_root(hsm, store, key, subject, timedelta(days=args.validity_days))
        cert = x509.load_der_x509_certificate(installed.certificate_der or b"")
        print(f"self-signed root CA {cert.subject.rfc4514_string()} installed for key {key.key_id}")
        return 0
    finally:
        hsm.close()
        store.close()


def write_dev_setup(
    state_dir: Path,
    config_path: Path,
    *,
    token: str = DEV_TOKEN,
    listen: str = "127.0.0.1:50051",
    workers: int = 2,
    softhsm2_conf: Path | None = None,
) -> None:
    """First run of the embedded default: SoftHSM token directory, PIN files (0600), configuration.

    softhsm2_conf names an existing SoftHSM configuration to add the token to (tests share
    one token directory); by default the token directory lives in the state directory.
    """
    from ca_daemon.hsm import initialize_token

    state_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(state_dir, 0o700)
    if softhsm2_conf is None:
        tokens = state_dir / "tokens"
        tokens.mkdir(mode=0o700, exist_ok=True)
        softhsm2_conf = state_dir / "softhsm2.conf"
        softhsm2_conf.write_text(f"directories.tokendir = {tokens.resolve()}\nobjectstore.backend = file\nlog.level = ERROR\n")
    pins = state_dir / "pins"
    pins.mkdir(mode=0o700, exist_ok=True)
    user_pin = _write_secret(pins / "user.pin")
    so_pin = _write_secret(pins / "so.pin")
    os.environ["SOFTHSM2_CONF"] = str(softhsm2_conf.resolve())
    initialize_token(config_module.DEFAULT_SOFTHSM_MODULE, token, so_pin, user_pin)
    config_path.write_text(
        config_module.default_dev_config(
            token=token, key_label=DEV_KEY_LABEL, listen=listen, workers=workers, softhsm2_conf=softhsm2_conf.resolve()
        )
    )
    print(f"created SoftHSM token {token!r} ({softhsm2_conf}), PIN files in {pins}, configuration {config_path}")


def _write_secret(path: Path) -> str:
    value = secrets.token_hex(16)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return value


# -- keys and CA certificates ----------------------------------------------


def _key_generate(args: argparse.Namespace) -> int:
    config = config_module.load(args.config)
    with app.connected(config) as (hsm, store):
        key = authority.create_ca_key(config, hsm, store, KeySpec(args.type), args.label)
        print(key.pkcs11_uri)
        return 0


def _key_list(args: argparse.Namespace) -> int:
    config = config_module.load(args.config)
    store = app.connect_store(config)
    try:
        rotation = RotationStore(store)
        for key in store.list_ca_keys():
            has_cert = "certificate installed" if key.certificate_der else "no certificate"
            line = f"{key.key_id}\t{key.spec.value}\t{key.status.value}\t{has_cert}\t{key.pkcs11_uri}"
            successor = rotation.unfinished_emergency(key)
            if key.halted_at is not None and successor is not None:  # an emergency that did not complete
                notice = authority.unfinished_emergency_notice(key.key_id, key.halted_at, successor, active=key.status == KeyStatus.ACTIVE)
                line += "\tHALTED " + notice
            print(line)
        return 0
    finally:
        store.close()


def _ca_csr(args: argparse.Namespace) -> int:
    with app.connected(config_module.load(args.config)) as (hsm, store):
        key = _known_key(store, args.label)
        Path(args.out).write_bytes(authority.ca_csr(hsm, key, issuer.parse_subject(args.subject)))
        print(f"wrote {args.out}")
        return 0


def _ca_import(args: argparse.Namespace) -> int:
    config = config_module.load(args.config)
    store = app.connect_store(config)
    try:
        key = _known_key(store, args.label)
        certs = cli_factory.pem_certificates("--cert", args.cert)
        if args.chain:
            certs += cli_factory.pem_certificates("--chain", args.chain)
        authority.import_ca_certificate(store, key, certs[0], certs[1:], policy_config=config)
        RotationStore(store).mark_published(key.key_id, datetime.now(UTC))  # starts its pre-publication (key rotation)
        print(f"installed certificate {certs[0].subject.rfc4514_string()} for CA key {key.key_id}")
        return 0
    finally:
        store.close()


def _ca_export(args: argparse.Namespace) -> int:
    config = config_module.load(args.config)
    store = app.connect_store(config)
    try:
        keys = store.list_ca_keys()
        active = [k for k in keys if k.status == KeyStatus.ACTIVE and k.certificate_der]
        key = active[0] if active else _first_key(keys, authority.key_id_for(Pkcs11Uri.parse(config.ca.key_uri)))
        assert key.certificate_der is not None
        expires = x509.load_der_x509_certificate(key.certificate_der).not_valid_after_utc
        if active and expires <= datetime.now(UTC):
            print(
                f"warning: the certificate of the active CA key {key.key_id} expired at {expires.isoformat()}: every Sign is "
                "refused until a successor is active (see Key rotation)",
                file=sys.stderr,
            )
        if args.format == "der":
            Path(args.out).write_bytes(key.certificate_der)
        else:
            Path(args.out).write_text(authority.chain_pem(key.certificate_der, key.chain_der))
        print(f"wrote {args.out}")
        return 0
    finally:
        store.close()


def _first_key(keys: list[CaKey], configured: str) -> CaKey:
    """With no active key: the configured key (ca.key), installed, which the daemon activates when it first starts.

    authority.load_active_ca makes it the signing key then, so its chain is the one devices will get:
    it can be registered with a cloud service or given to relying parties before the first `serve`.
    Before, export refused it until then, although `init` had nothing left to do. As the first start does, it
    refuses a key whose certificate or a parent's has expired, and says from when a parent not yet valid lets it start.
    """
    for key in keys:
        if key.key_id == configured and key.status == KeyStatus.PENDING and key.certificate_der:
            certificate = x509.load_der_x509_certificate(key.certificate_der)
            now = datetime.now(UTC)
            if certificate.not_valid_after_utc <= now:  # the first start would refuse it (authority.load_active_ca)
                raise CaError(
                    f"the certificate of CA key {configured} expired at {certificate.not_valid_after_utc.isoformat()}: the daemon "
                    "will not start with it; install a new one with `ca-daemon ca import-cert`"
                )
            # The first start refuses it too while a parent in its chain is not valid (authority.check_parents_valid).
            parents = [x509.load_der_x509_certificate(der) for der in key.chain_der]
            starts = max([certificate.not_valid_before_utc, *(parent.not_valid_before_utc for parent in parents)])
            try:  # when every certificate of the chain has begun: a parent that has expired by then never lets it start
                authority.check_parents_valid(key, max(now, starts), early_action="start it after")
            except FailedPrecondition as refused:
                raise CaError(f"the daemon will not start with CA key {configured}: {refused.message}") from None
            try:
                authority.check_parents_valid(key, now, early_action="start it after")
            except FailedPrecondition as early:  # a parent not yet valid: said here, as the first start would say it
                print(f"warning: {early.message}", file=sys.stderr)
            when = "first starts" if starts <= now else f"first starts after {starts.isoformat()}"
            print(
                f"CA key {configured} becomes the signing key when the daemon {when} (`ca-daemon serve`; it checks the "
                "token's key then): this is the chain it will issue under",
                file=sys.stderr,
            )
            return key
    raise CaError("no active CA key with a certificate; run `ca-daemon init` first")


def _known_key(store: SqlStore, label: str) -> CaKey:
    key = store.get_ca_key(label)
    if key is None:
        raise CaError(f"no CA key {label!r} in the store; `ca-daemon key list` shows the known keys")
    return key


def _check_config(args: argparse.Namespace) -> int:
    from ca_daemon import preflight

    results = preflight.run(args.config, emit=lambda check: print(check.line(), flush=True))
    return 0 if all(check.ok for check in results) else 1


def _db_migrate(args: argparse.Namespace) -> int:
    config = config_module.load(args.config)
    store = open_store(config.store.url, sqlite_synchronous=config.store.sqlite_synchronous, migrate=False)
    try:
        applied = store.migrate()
        print(f"schema at version {store.schema_version()}" + (f" (applied {applied})" if applied else " (up to date)"))
        return 0
    finally:
        store.close()


# -- profiles and reload ---------------------------------------------------


def _reload(args: argparse.Namespace) -> int:
    """Validate like the daemon will (including each profile's template lint), then SIGHUP it.

    A configuration the daemon would refuse is reported here and never signalled; the
    daemon re-checks it anyway (a SIGHUP sent by hand gets the same checks).
    """
    digest = config_module.file_digest(Path(args.config).resolve())  # before the checks: what they check
    config = config_module.load(args.config)
    app.check_tls_files(config)
    store = app.connect_store(app.running_config(config))  # the daemon's, until a restart opens another one
    try:
        authority.check_policy(config, store)
        return cli_access.signal_reload_and_report(config, store, digest=digest)
    finally:
        store.close()


def _profiles_list(args: argparse.Namespace) -> int:
    """ListProfiles, over mTLS when the daemon serves it (as every daemon outside development mode does)."""
    from ca_daemon.client import CaClient, TlsOptions

    target = args.target  # main filled in the default
    tls = None
    if args.tls_ca:
        tls = TlsOptions(args.tls_ca, args.tls_cert or None, args.tls_key or None, args.tls_server_name)
    elif args.tls_cert or args.tls_key:
        raise ValueError("--tls-cert/--tls-key need --tls-ca (the CA that signed the daemon's server certificate)")
    with CaClient(target, tls=tls, retries=0) as client:
        profiles = client.profiles()
    for profile in profiles:
        validity, longest = duration_text(profile.default_validity_seconds), duration_text(profile.max_validity_seconds)
        print(f"{profile.name}\t{profile.description}\tvalidity {validity} (max {longest})")
        for rule in profile.rules:
            print(f"  {rule}")
    return 0


def entry_point() -> None:
    sys.exit(main())


def duration_text(seconds: int) -> str:
    """A validity as a person reads it: whole days in days, else hours, else seconds (validity_seconds of an hour
    was listed as "validity 0 days")."""
    for unit, name in ((86400, "day"), (3600, "hour")):
        if seconds >= unit and seconds % unit == 0:
            count = seconds // unit
            return f"{count} {name}{'s' if count != 1 else ''}"
    return f"{seconds} s"
