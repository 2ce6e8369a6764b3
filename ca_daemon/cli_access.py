"""`ca-daemon mtls ...` and `ca-daemon audit ...`: set up mTLS and roles; export and verify the audit log.

Same layer as cli.py. Private keys of the server and of clients are generated here, in the
CLI process, and written to files (0600) on the side that will hold them; the daemon's
store records only their certificates.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import sys
from collections.abc import Iterator
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from ca_daemon import app, audit, tls
from ca_daemon import config as config_module
from ca_daemon.cli_factory import whole_number
from ca_daemon.errors import CaError, ConfigError
from ca_daemon.files import replaced_on_success
from ca_daemon.hsm import Hsm, Pkcs11Uri
from ca_daemon.store import SqlStore
from ca_daemon.store.audit_store import AuditStore

# mTLS server and client certificates: at least a day (0 made them expired when written), at most the mTLS CA's own validity.
MTLS_DAYS = whole_number(1, tls.CA_VALIDITY.days, " days")


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    mtls = sub.add_parser("mtls", help="mTLS for the gRPC interface: internal CA, server and client certificates").add_subparsers(
        metavar="ACTION"
    )
    p = mtls.add_parser("init", help="one command: mTLS CA key in the HSM, server certificate, client certificates, CRL, config")
    p.add_argument("--out", required=True, help="directory for ca.pem, server.pem/.key, client-ca.crl, clients/NAME.pem/.key")
    p.add_argument("--client", action="append", default=[], metavar="NAME:ROLE", help="a client and its role (repeatable)")
    p.add_argument("--host", action="append", default=[], help="server DNS name or IP (repeatable; default localhost and 127.0.0.1)")
    p.add_argument("--days", type=MTLS_DAYS, default=365, help="validity of server and client certificates (default 365, at most 3650)")
    p.add_argument("--apply", action="store_true", help="also switch the configuration to mTLS: [tls], [roles], [callers]")
    p.set_defaults(handler=_mtls_init)
    p = mtls.add_parser("issue", help="issue more client certificates (keys made here, never sent to the daemon)")
    p.add_argument("--out", required=True, help="directory to write clients/NAME.pem and .key to (that of `mtls init --out`)")
    p.add_argument("--client", action="append", required=True, metavar="NAME:ROLE", help="a client and its role (repeatable)")
    p.add_argument("--days", type=MTLS_DAYS, default=365, help="validity of the client certificates (default 365, at most 3650)")
    p.set_defaults(handler=_mtls_issue)
    p = mtls.add_parser("revoke", help="revoke a client or server certificate and rewrite the client CA CRL")
    p.add_argument("--serial", required=True, help="hexadecimal serial (`ca-daemon mtls list`)")
    p.add_argument(
        "--reason", type=int, choices=(0, 1, 2, 3, 4, 5, 6, 8, 9, 10), default=0, help="RFC 5280 reason code (default 0, unspecified)"
    )
    p.add_argument("--crl-out", default="", help="where to write the CRL (default: tls.client_crl of the configuration)")
    p.set_defaults(handler=_mtls_revoke)
    p = mtls.add_parser("crl", help="re-sign the client CA CRL (e.g. before its nextUpdate)")
    p.add_argument("--out", default="", help="default: tls.client_crl of the configuration")
    p.set_defaults(handler=_mtls_crl)
    p = mtls.add_parser(
        "renew-server", help="a new server key and certificate in place of tls.cert and tls.key; the daemon takes them at a reload"
    )
    p.add_argument("--host", action="append", default=[], help="server DNS name or IP (repeatable; default: the current certificate's)")
    p.add_argument("--days", type=MTLS_DAYS, default=365, help="validity of the new certificate (default 365, at most 3650)")
    p.add_argument("--reload", action="store_true", help="then have the running daemon put it in force (as `ca-daemon reload`)")
    p.set_defaults(handler=_mtls_renew_server)
    p = mtls.add_parser("list", help="certificates issued by the mTLS CA")
    p.set_defaults(handler=_mtls_list)

    aud = sub.add_parser("audit", help="the hash-chained audit log").add_subparsers(metavar="ACTION")
    p = aud.add_parser("public-key", help="write the audit public key (PEM) that verifies checkpoints")
    p.add_argument("--out", required=True, help="where to write the public key (PEM)")
    p.set_defaults(handler=_audit_public_key)
    p = aud.add_parser("checkpoint", help="sign a checkpoint of the current chain head now")
    p.set_defaults(handler=_audit_checkpoint)
    p = aud.add_parser("export", help="write the log with its checkpoints as JSON Lines")
    p.add_argument("--out", required=True, help="file to write ('-' for stdout)")
    p.add_argument("--checkpoint", action="store_true", help="sign a checkpoint of the current head first, so every event is covered")
    p.set_defaults(handler=_audit_export)
    p = aud.add_parser("verify", help="check an export (or the live database) with only the audit public key")
    p.add_argument("--public-key", required=True, help="PEM from `ca-daemon audit public-key`")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--file", help="a JSON Lines export")
    src.add_argument(
        "--live",
        action="store_true",
        help="the database named by the configuration; its certificates and revocations are compared with the log too",
    )
    p.add_argument(
        "--previous",
        metavar="FILE",
        help="an earlier export of the same log (yours): the log must still hold its events unchanged, which catches a "
        "log rolled back or rewritten and then signed again",
    )
    p.set_defaults(handler=_audit_verify)


def operator_actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


def _clients(specs: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for spec in specs:
        name, sep, role = spec.rpartition(":")
        if not sep or not name or role not in config_module.ROLES:
            raise ConfigError(f"--client {spec!r}: use NAME:ROLE with ROLE one of {', '.join(config_module.ROLES)}")
        tls.check_client_name(name)  # before anything is issued or written
        pairs.append((name, role))
    return pairs


@contextlib.contextmanager
def _open(args: argparse.Namespace) -> Iterator[tuple[config_module.Config, Hsm, SqlStore]]:
    config = config_module.load(args.config)
    with app.connected(config) as (hsm, store):
        yield config, hsm, store


def _issue_clients(ca: tls.MtlsCa, store: SqlStore, out: Path, clients: list[tuple[str, str]], days: int) -> None:
    from datetime import timedelta

    for name, role in clients:
        key = tls.new_key()
        cert = tls.issue(
            ca, store, tls.make_csr(key, name), name=name, role=role, kind="client", actor=operator_actor(), validity=timedelta(days=days)
        )
        tls.write_private(out / "clients" / f"{name}.key", tls.key_pem(key))
        (out / "clients" / f"{name}.pem").write_bytes(tls.pem(cert))
        print(f"client {name} ({role}): {out / 'clients' / (name + '.pem')}, serial {cert.serial_number:x}")


def _mtls_init(args: argparse.Namespace) -> int:
    from datetime import timedelta

    clients = _clients(args.client)
    out = Path(args.out).resolve()
    with _open(args) as (config, hsm, store):
        ca, created = tls.ensure_mtls_ca(hsm, store, config.tls.ca_key_uri, operator_actor())
        print(("created" if created else "using") + f" mTLS CA {ca.certificate.subject.rfc4514_string()} (key {config.tls.ca_key_uri})")
        out.mkdir(parents=True, exist_ok=True)
        (out / "ca.pem").write_bytes(tls.pem(ca.certificate))
        key = tls.new_key()
        server = tls.issue(
            ca,
            store,
            tls.make_csr(key, "ca-daemon"),
            name="ca-daemon",
            role="",
            kind="server",
            actor=operator_actor(),
            hosts=args.host,
            validity=timedelta(days=args.days),
        )
        tls.write_private(out / "server.key", tls.key_pem(key))
        (out / "server.pem").write_bytes(tls.pem(server))
        _issue_clients(ca, store, out, clients, args.days)
        tls.write_crl(ca, store, out / "client-ca.crl", actor=operator_actor(), reason="mtls init")
        snippet = _snippet(out, clients)
        (out / "mtls.toml").write_text(snippet)
        if args.apply:
            _apply(config.path, snippet)
            print(f"configuration {config.path} switched to mTLS (server.dev_mode = false); restart the daemon")
        else:
            print(f"wrote {out}; add {out / 'mtls.toml'} to the configuration and set server.dev_mode = false (or rerun with --apply)")
        return 0


def _snippet(out: Path, clients: list[tuple[str, str]]) -> str:
    lines = [
        '# Written by `ca-daemon mtls init`. See README.md, "mTLS and roles".',
        "[tls]",
        f'cert = "{out / "server.pem"}"',
        f'key = "{out / "server.key"}"',
        f'client_ca = "{out / "ca.pem"}"',
        f'client_crl = "{out / "client-ca.crl"}"',
        "",
        '# role -> identities (certificate CN), "uri:REGEX" (SAN URI) or "ou:REGEX" (subject OU).',
        "[roles]",
    ]
    for role in config_module.ROLES:
        names = [name for name, r in clients if r == role]
        lines.append(f"{role} = [{', '.join(_quote(n) for n in names)}]")
    for name, role in clients:
        if role == "programmer":
            lines += ["", f"[callers.{_quote(name)}]", 'profiles = ["device"]']
    return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _apply(path: Path, snippet: str) -> None:
    text = path.read_text()
    if "\n[tls]" in text or "\n[roles]" in text:
        raise ConfigError(f"{path} already has [tls] or [roles]; merge {snippet.splitlines()[0]} by hand")
    if "dev_mode = true" not in text:
        raise ConfigError(f"{path}: expected `dev_mode = true` to switch off")
    text = text.replace("dev_mode = true", "dev_mode = false", 1)
    new = text.rstrip("\n") + "\n\n" + snippet
    config_module.parse(__import__("tomllib").loads(new), path)  # refuse to write a configuration that would not load
    path.write_text(new)


def _mtls_issue(args: argparse.Namespace) -> int:
    clients = _clients(args.client)
    with _open(args) as (config, hsm, store):
        ca, _ = tls.ensure_mtls_ca(hsm, store, config.tls.ca_key_uri, operator_actor())
        _issue_clients(ca, store, Path(args.out).resolve(), clients, args.days)
        for name, role in clients:
            print(f"grant it in the configuration: [roles] {role} = [..., {_quote(name)}]")
        return 0


def _crl_target(config: config_module.Config, out: str, option: str) -> Path:
    target = Path(out) if out else config.tls.client_crl_file
    if target is None:
        raise ConfigError(f"no tls.client_crl in the configuration; name the file with {option}")
    return target


def _write_crl(config: config_module.Config, hsm: Hsm, store: SqlStore, target: Path, reason: str) -> Path:
    ca, _ = tls.ensure_mtls_ca(hsm, store, config.tls.ca_key_uri, operator_actor())
    crl = tls.write_crl(ca, store, target, actor=operator_actor(), reason=reason)
    print(f"wrote {target}: {len(list(crl))} revoked, next update {crl.next_update_utc}")
    return target


def _mtls_revoke(args: argparse.Namespace) -> int:
    with _open(args) as (config, hsm, store):
        # Before the revocation: it was recorded, then the command failed for want of a CRL file, and its rerun said 'already revoked'.
        target = _crl_target(config, args.crl_out, "--crl-out")
        ca_key_id = Pkcs11Uri.parse(config.tls.ca_key_uri).label
        tls.revoke(store, args.serial, args.reason, operator_actor(), ca_key_id)
        _write_crl(config, hsm, store, target, f"revoked {args.serial}")
        return 0


def _mtls_crl(args: argparse.Namespace) -> int:
    with _open(args) as (config, hsm, store):
        _write_crl(config, hsm, store, _crl_target(config, args.out, "--out"), "re-signed by the operator")
        return 0


def _mtls_renew_server(args: argparse.Namespace) -> int:
    from datetime import timedelta

    with _open(args) as (config, hsm, store):
        settings = config.tls
        if settings.cert_file is None or settings.key_file is None:
            raise ConfigError("the configuration has no [tls] section; set up mTLS first with `ca-daemon mtls init`")
        ca = tls.load_mtls_ca(hsm, store, settings.ca_key_uri)
        if ca is None:
            raise ConfigError(f"no internal mTLS CA ({settings.ca_key_uri}) in the store; `ca-daemon mtls init` creates it")
        server = tls.renew_server(
            ca, store, settings.cert_file, settings.key_file, hosts=args.host, validity=timedelta(days=args.days), actor=operator_actor()
        )
        print(
            f"wrote {settings.cert_file} and {settings.key_file}: serial {server.serial_number:x}, "
            f"for {', '.join(tls.server_hosts(server))}, expires {server.not_valid_after_utc.isoformat()}"
        )
    if not args.reload:
        print("the running daemon uses it after `ca-daemon reload` (or a restart)")
        return 0
    store = app.connect_store(app.running_config(config))  # where the daemon records its reloads
    try:
        return signal_reload_and_report(config, store, checked=False)
    finally:
        store.close()


def signal_reload_and_report(config: config_module.Config, store: SqlStore, *, checked: bool = True, digest: bytes | None = None) -> int:
    """SIGHUP the daemon, then report what its workers recorded of the reload (app.await_reload).

    Applied by all, refused (each worker's reason), applied by some and refused or unanswered
    by others (the workers now differ), and the changed settings read at start only. Before,
    the command said only that it had asked: a changed listen address or [crl] setting went
    unnoticed but for a warning in the daemon's log. checked: this command validated the file;
    digest: the SHA-256 of the bytes it validated (read before the checks), else of the file now.
    """
    after = AuditStore(store).last_seq()
    if digest is None:
        digest = config_module.file_digest(config.path)
    try:
        pid = app.signal_reload(config)
    except CaError as exc:
        raise CaError(f"{exc.message}; the configuration is valid" if checked else exc.message) from None
    print(f"configuration valid; asked ca-daemon (pid {pid}) to reload it" if checked else f"asked ca-daemon (pid {pid}) to reload")
    outcome = app.await_reload(store, after, pid, digest)
    if outcome is None:
        print(
            f"no worker recorded the reload within {app.RELOAD_WAIT_S:g} s (no config.reload audit event); see the daemon's log",
            file=sys.stderr,
        )
        return 1
    for refusal in outcome.refusals:
        print(f"reload refused by {refusal}", file=sys.stderr)
    if outcome.other_file:
        print(f"warning: the workers read a version of {config.path} other than the one this command checked", file=sys.stderr)
    if outcome.applied and (outcome.refusals or outcome.silent):
        print(
            f"applied by {outcome.applied} of {outcome.workers} worker(s), refused by {len(outcome.refusals)}, no answer from "
            f"{outcome.silent} within {app.RELOAD_WAIT_S:g} s: the workers may now differ; fix the file and reload again, or restart",
            file=sys.stderr,
        )
        return 1
    if not outcome.applied:
        print("the previous configuration stays in force", file=sys.stderr)
        return 1
    print(f"applied by {outcome.applied} worker(s): {', '.join(sorted(config.profiles))} in force")
    if outcome.restart_needed:
        print(f"changed but read at start only, so not in force until a restart: {', '.join(outcome.restart_needed)}", file=sys.stderr)
    return 0


def _mtls_list(args: argparse.Namespace) -> int:
    config = config_module.load(args.config)
    store = app.connect_store(config)
    try:
        for c in AuditStore(store).mtls_certificates():
            state = f"revoked {c.revoked_at.isoformat()}" if c.revoked_at else "valid"
            print(f"{c.serial}\t{c.kind}\t{c.name}\t{c.role or '-'}\tnot after {c.not_after.isoformat()}\t{state}")
        return 0
    finally:
        store.close()


def _audit_public_key(args: argparse.Namespace) -> int:
    config = config_module.load(args.config)
    hsm = app.connect_hsm(config)
    try:
        Path(args.out).write_bytes(audit.audit_public_key_pem(hsm, config.audit.key_uri))
        print(f"wrote {args.out}")
        return 0
    finally:
        hsm.close()


def _checkpoint(config: config_module.Config) -> None:
    with app.connected(config) as (hsm, store):
        made = audit.Checkpointer(hsm, store, config.audit.key_uri).checkpoint()
        print(
            f"checkpoint at seq {made.seq} ({made.count} events)" if made else "the last checkpoint already covers the head",
            file=sys.stderr,
        )


def _audit_checkpoint(args: argparse.Namespace) -> int:
    _checkpoint(config_module.load(args.config))
    return 0


def _audit_export(args: argparse.Namespace) -> int:
    config = config_module.load(args.config)
    if args.checkpoint:
        _checkpoint(config)
    store = app.connect_store(config)
    try:
        if args.out == "-":
            events, checkpoints = audit.export(store, sys.stdout)
        else:
            with replaced_on_success(Path(args.out)) as out:  # a failed export leaves an earlier file as it was
                events, checkpoints = audit.export(store, out)
        print(f"exported {events} events and {checkpoints} checkpoints", file=sys.stderr)
        return 0
    finally:
        store.close()


def _audit_verify(args: argparse.Namespace) -> int:
    public = _public_key_file(args.public_key)
    earlier = None
    if args.previous:
        with open(args.previous, encoding="utf-8", errors="replace") as lines:
            earlier_report, earlier = audit.read_earlier(audit.read_export(lines), public)
        if not earlier_report.ok:
            print(f"the earlier export {args.previous} does not verify itself, so nothing is compared with it: {earlier_report.summary()}")
            return 1
    if args.file:
        with open(args.file, encoding="utf-8", errors="replace") as lines:
            report = audit.verify(audit.read_export(lines), public, export_file=True, earlier=earlier)
    else:
        config = config_module.load(args.config)
        store = app.connect_store(config)
        try:
            report = audit.verify(audit.live_records(store), public, earlier=earlier)
            audit.reconcile(store, report)
        finally:
            store.close()
    print(report.summary())
    for problem in report.problems[1:20]:
        print(f"  also: {problem}")
    return 0 if report.ok else 1


def _public_key_file(path: str) -> bytes:
    """The PEM of the --public-key file, checked first: a file of another kind failed with cryptography's "Unable to
    load PEM file ... MalformedFraming" (or "Valid PEM but no BEGIN PUBLIC KEY"), naming neither option nor file."""
    data = Path(path).read_bytes()
    try:
        serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        kind = "a certificate" if b"-----BEGIN CERTIFICATE-----" in data else "empty" if not data.strip() else "not PEM"
        raise ValueError(
            f"--public-key {path} is {kind}, not a PEM public key (-----BEGIN PUBLIC KEY-----): write the audit key's with "
            "`ca-daemon audit public-key --out FILE`"
        ) from None
    return data


__all__ = ["add_commands", "CaError"]
