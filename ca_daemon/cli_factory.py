"""The factory-to-cloud commands of `ca-daemon`: client, simulate-factory, verify-device,
ca verification-cert and crl publish | raise-number | fetch. Registered by cli.py; kept apart so the set-up commands
and these user-facing ones can change independently.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ca_daemon._proto.ca_daemon.v1 import ca_pb2
from ca_daemon.client import REASONS, CaClient, TlsOptions
from ca_daemon.errors import CaError
from ca_daemon.files import replaced_on_success, write_atomically

DEFAULT_TARGET = "127.0.0.1:50051"
TARGET_HELP = (
    "daemon address HOST:PORT (default: server.listen of the configuration file, that of --config or CA_DAEMON_CONFIG, "
    f"else state/ca-daemon.toml if it exists; without one, {DEFAULT_TARGET})"
)


# -- shared client options -------------------------------------------------------------


def add_client_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="", help=TARGET_HELP)
    p.add_argument("--tls-ca", default="", help="CA bundle (PEM) for the daemon's server certificate; enables TLS")
    p.add_argument("--tls-cert", default="", help="this client's certificate (PEM) for mTLS")
    p.add_argument("--tls-key", default="", help="this client's private key (PEM) for mTLS")
    p.add_argument("--tls-server-name", default="", help="name to check in the server certificate (default: the target host)")
    p.add_argument("--timeout", type=positive_seconds, default=10.0, help="seconds per call (default 10)")
    p.add_argument(
        "--retries",
        type=whole_number(0, 100),
        default=5,
        help="retries of a call answered UNAVAILABLE or timed out (default 5, at most 100)",
    )


# How gRPC reports a connection that was never made (refused, unresolvable, no route, a missing Unix socket).
_REFUSED = "Connection refused"
_UNREACHABLE = (
    "errors resolving",
    "DNS resolution failed",
    "Domain name not found",
    "No route to host",
    "Network is unreachable",
    "Host is unreachable",
    "Connection timed out",
    "No such file or directory",
)


def unreachable(target: str, details: str) -> str | None:
    """What to tell a person whose call ended UNAVAILABLE without any daemon answering; None if one may have.

    A refused or unroutable connection said "the daemon answered UNAVAILABLE" and suggested the mTLS
    options, as for a plaintext client that an mTLS daemon hangs up on: neither applies when nothing is
    listening, or the address does not lead anywhere.
    """
    if _REFUSED in details:
        return f"nothing is listening at {target} (connection refused): is the daemon running, and is that its server.listen?"
    if any(marker in details for marker in _UNREACHABLE):
        return f"cannot reach {target}: {details}"
    return None


def client_from_args(args: argparse.Namespace) -> CaClient:
    tls = None
    if args.tls_ca:
        tls = TlsOptions(args.tls_ca, args.tls_cert or None, args.tls_key or None, args.tls_server_name)
    elif args.tls_cert or args.tls_key:
        raise ValueError("--tls-cert/--tls-key need --tls-ca (the CA that signed the daemon's server certificate)")
    # The simulator spreads its devices over several connections, as several stations would (see CaClient).
    connections = max(1, min(getattr(args, "concurrency", 1), 8))
    return CaClient(args.target, tls=tls, timeout=args.timeout, retries=args.retries, connections=connections)


def add_client_commands(client: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`ca-daemon client ACTION`: what a programming service or an operator does over gRPC."""
    p = client.add_parser("sign", help="send a CSR file, write the certificate and chain")
    add_client_options(p)
    p.add_argument("--csr", required=True, help="CSR file, PEM or DER")
    p.add_argument("--out", required=True, help="where to write the certificate followed by its chain (PEM)")
    p.add_argument("--request-id", default="", help="idempotency key (default: a fresh UUID); reuse it to retry safely")
    p.add_argument("--profile", default="", help="certificate profile (default: the daemon's default; `ca-daemon profiles list`)")
    p.set_defaults(handler=_client_sign)

    p = client.add_parser("ca-certs", help="print the CA certificates (PEM)")
    add_client_options(p)
    p.set_defaults(handler=_client_ca_certs)

    p = client.add_parser("chain", help="write the active CA chain, PEM (whole chain) or DER (the issuing CA certificate)")
    add_client_options(p)
    p.add_argument("--out", required=True, help="where to write it")
    p.add_argument(
        "--format", choices=["pem", "der"], default="pem", help="pem: the whole chain (default); der: the issuing CA certificate"
    )
    p.set_defaults(handler=_client_chain)

    p = client.add_parser("get", help="print an issued certificate by serial")
    add_client_options(p)
    p.add_argument("--serial", required=True, help="hexadecimal serial number, as `client sign` prints it")
    p.set_defaults(handler=_client_get)

    p = client.add_parser(
        "revoke",
        help="revoke a certificate by serial (Revoke: programmer or officer role; a CA link certificate: officer), "
        "or every certificate of a device (officer)",
    )
    add_client_options(p)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--serial", help="hexadecimal serial number")
    which.add_argument("--device-id", help="revoke every unrevoked certificate of this device (RevokeBulk: officer role)")
    p.add_argument(
        "--reason",
        default="unspecified",
        choices=sorted(REASONS),
        help="RFC 5280 reason (default unspecified); only certificate-hold can be lifted",
    )
    p.add_argument(
        "--invalidity-date",
        type=invalidity_date,
        help="when the key was, or is suspected to have been, compromised: ISO 8601 date-time, UTC unless it has an offset "
        "(e.g. 2026-11-20T08:00:00Z); not in the future",
    )
    p.set_defaults(handler=_client_revoke)

    p = client.add_parser("unrevoke", help="lift a certificate hold (revoke --reason certificate-hold) (Unrevoke: officer role)")
    add_client_options(p)
    p.add_argument("--serial", required=True, help="hexadecimal serial number of the certificate on hold")
    p.set_defaults(handler=_client_unrevoke)

    p = client.add_parser("crl", help="fetch the last published full or delta CRL (GetCRL)")
    add_client_options(p)
    p.add_argument("--delta", action="store_true", help="the delta CRL instead of the full one")
    p.add_argument("--out", required=True, help="where to write it")
    p.add_argument("--format", choices=["der", "pem"], default="der", help="default der")
    p.add_argument("--issuer-key-id", default="", help="CA key (default: the active one)")
    p.set_defaults(handler=_client_crl)

    p = client.add_parser("audit-export", help="write the audit log and its signed checkpoints for `ca-daemon audit verify` (auditor role)")
    add_client_options(p)
    p.add_argument("--out", required=True, help="JSON Lines file to write")
    p.set_defaults(handler=_client_audit_export)

    p = client.add_parser("verification-cert", help="have the CA sign a cloud verification certificate (officer role)")
    add_client_options(p)
    p.add_argument("--code", required=True, help="the verification code the cloud service shows")
    p.add_argument("--out", required=True, help="where to write the certificate (PEM; .der/.cer: DER)")
    p.set_defaults(handler=_client_verification_cert)


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser], ca: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Top-level simulate-factory, verify-device and crl; `ca verification-cert`."""
    from ca_daemon.simulate import DEFAULT_SAN_URI, KEY_TYPES

    p = sub.add_parser("simulate-factory", help="provision simulated devices: key on the device, CSR, Sign, install")
    add_client_options(p)
    p.add_argument("--devices", type=int, required=True, help="how many devices")
    p.add_argument("--out", default="devices", help="directory for the per-device directories (default ./devices)")
    p.add_argument("--no-install", action="store_true", help="do not write the devices' files (benchmarking)")
    p.add_argument("--concurrency", type=int, default=8, help="devices in flight at once (default 8)")
    p.add_argument("--key-type", default="ec-p256", choices=KEY_TYPES, help="the devices' key type (default ec-p256)")
    p.add_argument("--profile", default="", help="certificate profile (default: the daemon's default profile)")
    p.add_argument("--prefix", default="", help="device ID prefix (default: sim-RANDOM); IDs are PREFIX-000000...")
    p.add_argument("--san-uri", default=DEFAULT_SAN_URI, help=f"SAN URI template, '' for none (default {DEFAULT_SAN_URI})")
    p.add_argument("--pregenerate", action="store_true", help="make every key first, to report the rate without key generation")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_simulate)

    p = sub.add_parser("verify-device", help="decide as a cloud service would whether to trust a device certificate")
    p.add_argument("--cert", required=True, help="the device certificate (PEM; may be followed by intermediates)")
    p.add_argument("--chain", default="", help="intermediate CA certificates (PEM)")
    p.add_argument("--trust", required=True, help="trusted CA certificates (PEM), e.g. from `ca-daemon ca export`")
    p.add_argument("--key", default="", help="act as the device: sign a fresh challenge with this key (PEM)")
    p.add_argument(
        "--challenge", default="", help="the 32-byte challenge your service sent to the device (hex; use each once), with --signature"
    )
    p.add_argument("--signature", default="", help="file with the device's signature over the challenge")
    p.add_argument("--identity", choices=["san-uri", "cn"], default="san-uri", help="where the device ID is (default san-uri)")
    p.add_argument(
        "--uri-template", default="urn:dev:ops:{device_id}", help="the SAN URI that holds the device ID (default urn:dev:ops:{device_id})"
    )
    p.add_argument(
        "--device-id-pattern",
        default=r"^[A-Za-z0-9._-]{1,64}$",
        help=r"regular expression a device ID must match (default ^[A-Za-z0-9._-]{1,64}$)",
    )
    p.add_argument("--no-crl", action="store_true", help="skip the revocation step (a CA without CRLs)")
    p.set_defaults(handler=_verify_device)

    p = ca.add_parser("verification-cert", help="sign a cloud CA-registration (proof of possession) certificate with the CA key")
    p.add_argument("--code", required=True, help="the verification code from Azure DPS / IoT Hub or AWS IoT")
    p.add_argument("--out", required=True, help="where to write the certificate (PEM; .der/.cer: DER)")
    p.add_argument(
        "--validity-days", type=whole_number(1, 30, " days"), default=1, help="validity of the verification certificate (default 1 day)"
    )
    p.set_defaults(handler=_ca_verification_cert)

    crl = sub.add_parser("crl", help="CRLs").add_subparsers(metavar="ACTION")
    p = crl.add_parser("publish", help="publish a full (or delta) CRL now, e.g. for a broker that reads only full CRLs")
    p.add_argument("--delta", action="store_true", help="a delta CRL instead of a full one")
    p.add_argument(
        "--clock-was-ahead",
        action="store_true",
        help="the clock was ahead when the last CRLs were made (relying parties refuse them as not yet valid) and is right now: "
        "publish a full and a delta CRL (with [crl] delta = false the full one only) of each CA key dated now, earlier than those "
        "(audited)",
    )
    p.set_defaults(handler=_crl_publish)
    p = crl.add_parser(
        "raise-number", help="number every later CRL of a CA key above N (after a restore, N = the newest CRL number relying parties saw)"
    )
    p.add_argument("--issuer", required=True, help="the CA key id (`ca-daemon key list`), e.g. ca-root-1")
    p.add_argument(
        "--above",
        type=crl_number,
        required=True,
        help="decimal, or hex as `openssl crl -in CRL -noout -crlnumber` prints it for the newest published CRL (crlNumber=0x1A or 0x1A)",
    )
    p.set_defaults(handler=_crl_raise_number)
    p = crl.add_parser(
        "fetch",
        help="install the current full CRLs, fetched over HTTP and checked, into a broker's CRL file (Mosquitto crlfile); "
        "deploy/mosquitto-crl-refresh.timer runs it hourly",
    )
    p.add_argument(
        "--url",
        action="append",
        required=True,
        help="a full CRL's URL (the CDP URL, e.g. http://ca.example.net:8080/crl/ca-root-1.crl); one per CA key that signs CRLs, "
        "repeated during a key rotation; the file holds them in this order",
    )
    p.add_argument(
        "--trust", required=True, help="the CA certificates the broker trusts (its cafile, PEM): every CRL must be signed by one"
    )
    p.add_argument("--out", required=True, help="the CRL file to keep current (PEM); replaced atomically, and only if its content changes")
    p.add_argument(
        "--on-change",
        default="",
        help="command to run after the file changed, e.g. 'systemctl reload mosquitto.service' (split as a shell would, "
        "not run by one); if it fails, the previous file is put back and the command exits 1",
    )
    p.set_defaults(handler=_crl_fetch)


def whole_number(minimum: int, maximum: int, unit: str = "") -> Callable[[str], int]:
    """An argparse type: a whole number from minimum to maximum, else a usage error naming the range.

    A plain type=int let 0 days make a certificate expired when written, a count of days too large for a
    date end in an OverflowError traceback, and --retries -1 end in an AssertionError traceback.
    """

    def parse(text: str) -> int:
        try:
            value = int(text.strip(), 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(f"{value} is out of range: give {minimum} to {maximum}{unit}")
        return value

    return parse


def positive_seconds(text: str) -> float:
    """An argparse type for --timeout: seconds, more than 0 and at most a day."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= 86400:  # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"{text} is out of range: give more than 0 and at most 86400 seconds")
    return value


def crl_number(text: str) -> int:
    """A CRL number as an operator has it: decimal, or `openssl crl -noout -crlnumber`'s hex (`crlNumber=0x1A`).

    OpenSSL prints the number in hex: read as a decimal, `0x10` without its prefix would be 10, below the
    16 relying parties saw, and the next CRL would not be newer than theirs. So hex needs its `0x`.
    """
    value = text.strip().removeprefix("crlNumber=")
    try:
        return int(value, 16) if value.lower().startswith("0x") else int(value, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a CRL number: give it in decimal (26) or in hex with its 0x (0x1A), "
            "as `openssl crl -noout -crlnumber` prints it (crlNumber=0x1A)"
        ) from None


def invalidity_date(text: str) -> datetime:
    """An ISO 8601 date-time for --invalidity-date; without an offset it is UTC, as every time the daemon shows is."""
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO 8601 date-time: give e.g. 2026-11-20T08:00:00Z or 2026-11-20T09:00:00+01:00"
        ) from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


# -- client handlers ---------------------------------------------------------------------


def _client_sign(args: argparse.Namespace) -> int:
    """The output file is opened before the CSR is sent: a certificate issued and then not written is lost to the
    device (its next request is refused, rule device-unique), so an --out that cannot be written refuses first, and a
    write that fails after the issuance says which request_id gets that same certificate again."""
    csr = Path(args.csr).read_bytes()
    issued = None
    try:
        with replaced_on_success(Path(args.out)) as out:
            with client_from_args(args) as ca:
                issued = ca.sign(csr, request_id=args.request_id, profile=args.profile)
            out.write(issued.certificate_pem + issued.chain_pem)
    except OSError as exc:
        if issued is None:
            raise
        raise OSError(
            f"issued serial {issued.serial} for device {issued.device_id} but could not write {args.out} ({exc}); "
            f"run the command again with --request-id {issued.request_id} to get the same certificate"
        ) from None
    print(f"issued serial {issued.serial} for device {issued.device_id}; wrote {args.out}")
    return 0


def _client_ca_certs(args: argparse.Namespace) -> int:
    with client_from_args(args) as ca:
        for cert in ca.ca_certificates():
            sys.stdout.write(cert.certificate_pem)
    return 0


def _client_chain(args: argparse.Namespace) -> int:
    with client_from_args(args) as ca:
        chain = ca.chain_pem()
    _write_certificates(Path(args.out), x509.load_pem_x509_certificates(chain.encode()), args.format)
    print(f"wrote {args.out}")
    return 0


def _client_get(args: argparse.Namespace) -> int:
    """The certificate's PEM on stdout, for pipes; on stderr, what it is and whether it is revoked."""
    with client_from_args(args) as ca:
        found = ca.certificate(args.serial)
    sys.stdout.write(found.certificate_pem)
    print(certificate_status(found), file=sys.stderr)
    return 0


def certificate_status(found: ca_pb2.GetCertificateResponse) -> str:
    """One line: serial, device, profile, CA key, validity, and the revocation if there is one (reasons as --reason names them)."""
    validity = f"valid {found.not_before.ToDatetime(tzinfo=UTC).isoformat()} to {found.not_after.ToDatetime(tzinfo=UTC).isoformat()}"
    line = f"serial {found.serial}: device {found.device_id}, profile {found.profile}, CA key {found.issuer_key_id}, {validity}; "
    if not found.HasField("revocation"):
        return line + "not revoked"
    revocation = found.revocation
    reason = next((name for name, code in REASONS.items() if code == revocation.reason), f"reason code {revocation.reason}")
    line += f"revoked ({reason}) at {revocation.revoked_at.ToDatetime(tzinfo=UTC).isoformat()}"
    if revocation.HasField("invalidity_date"):
        line += f", invalidity date {revocation.invalidity_date.ToDatetime(tzinfo=UTC).isoformat()}"
    return line


def _client_revoke(args: argparse.Namespace) -> int:
    invalid_since = f", invalidity date {args.invalidity_date.isoformat()}" if args.invalidity_date else ""
    with client_from_args(args) as ca:
        if args.serial:
            at = ca.revoke(args.serial, reason=args.reason, invalidity_date=args.invalidity_date)
            print(f"revoked {_canonical(args.serial)} ({args.reason}) at {at.isoformat()}{invalid_since}")
        else:
            serials = ca.revoke_device(args.device_id, reason=args.reason, invalidity_date=args.invalidity_date)
            if serials:
                print(f"revoked {len(serials)} certificate(s) of device {args.device_id}: {' '.join(serials)}")
            else:
                print(f"device {args.device_id} has no unrevoked certificate: nothing was revoked")
    return 0


def _client_unrevoke(args: argparse.Namespace) -> int:
    with client_from_args(args) as ca:
        ca.unrevoke(args.serial)
    print(f"lifted the hold of {_canonical(args.serial)}: it is valid again, and the next delta CRL lists it as removeFromCRL")
    return 0


def _canonical(serial: str) -> str:
    """A serial the daemon accepted, as it and every other output write serials: lowercase hex, no colons or leading zeros."""
    from ca_daemon.policy import parse_serial

    return f"{parse_serial(serial):x}"


def _client_crl(args: argparse.Namespace) -> int:
    with client_from_args(args) as ca:
        crl = ca.crl(delta=args.delta, issuer_key_id=args.issuer_key_id)
    data = crl.der if args.format == "der" else x509.load_der_x509_crl(crl.der).public_bytes(serialization.Encoding.PEM)
    write_atomically(Path(args.out), data)  # a broker's crlfile: never half a CRL, whatever stops the write
    kind = "delta" if args.delta else "full"
    validity = f"thisUpdate {crl.this_update.isoformat()}, nextUpdate {crl.next_update.isoformat()}"
    print(f"wrote {kind} CRL {crl.number} ({validity}) to {args.out}")
    return 0


def _client_audit_export(args: argparse.Namespace) -> int:
    with client_from_args(args) as ca, replaced_on_success(Path(args.out)) as out:  # a failure leaves an earlier file as it was
        events, checkpoints = ca.audit_export(out)
    print(f"wrote {events} audit events and {checkpoints} signed checkpoints to {args.out}")
    print(f"check it with: ca-daemon audit verify --file {args.out} --public-key AUDIT-PUBLIC-KEY.pem")
    return 0


def _client_verification_cert(args: argparse.Namespace) -> int:
    with client_from_args(args) as ca:
        result = ca.verification_certificate(args.code)
    cert = x509.load_der_x509_certificate(result.certificate_der)
    _write_certificates(Path(args.out), [cert], _format_for(args.out))
    print(f"wrote verification certificate {result.serial} (CN={args.code}, signed by CA key {result.issuer_key_id}) to {args.out}")
    return 0


# -- simulator, verifier, officer commands ---------------------------------------------------


def _simulate(args: argparse.Namespace) -> int:
    from ca_daemon.simulate import Progress, simulate

    out = None if args.no_install else Path(args.out)
    with client_from_args(args) as ca:
        summary = simulate(
            ca,
            devices=args.devices,
            out_dir=out,
            prefix=args.prefix,
            concurrency=args.concurrency,
            key_type=args.key_type,
            profile=args.profile,
            san_uri_template=args.san_uri,
            pregenerate=args.pregenerate,
            progress=None if args.quiet else Progress(args.devices),
        )
    for line in summary.lines():
        print(line)
    unavailable = [reason.removeprefix("UNAVAILABLE: ") for reason in summary.reasons if reason.startswith("UNAVAILABLE")]
    if not summary.issued and unavailable:
        if why := unreachable(args.target, unavailable[0]):
            print(f"ca-daemon: no device was issued: {why}", file=sys.stderr)
        elif not args.tls_ca:
            # A plaintext client meets an mTLS daemon as a closed socket; only the daemon's log says why.
            print(
                "ca-daemon: no device was issued and the daemon was unreachable; "
                "if it serves mTLS (server.dev_mode = false), pass --tls-ca, --tls-cert and --tls-key",
                file=sys.stderr,
            )
    if out is not None and summary.issued:
        print(f"installed {summary.issued} device(s) under {out}/DEVICE_ID/ (device.key 0600, device.crt, chain.pem, fullchain.pem)")
    return 0 if summary.failed == 0 and summary.refused == 0 else 1


def _verify_device(args: argparse.Namespace) -> int:
    from ca_daemon.verify import DeviceVerifier, IdentityRule, sign_challenge

    certs = x509.load_pem_x509_certificates(Path(args.cert).read_bytes())
    intermediates = certs[1:] + (x509.load_pem_x509_certificates(Path(args.chain).read_bytes()) if args.chain else [])
    trusted = x509.load_pem_x509_certificates(Path(args.trust).read_bytes())
    verifier = DeviceVerifier(
        trusted,
        IdentityRule(args.identity, args.uri_template, args.device_id_pattern),
        check_revocation=not args.no_crl,
    )
    if args.key:
        if args.challenge or args.signature:
            raise ValueError("give either --key (sign a fresh challenge as the device) or --challenge with --signature")
        key = serialization.load_pem_private_key(Path(args.key).read_bytes(), password=None)
        challenge = verifier.challenge()  # issued by the verifier, as a service would, then answered by the device
        signature = sign_challenge(key, challenge)  # type: ignore[arg-type]
    elif args.challenge and args.signature:
        # This process did not issue the challenge: the service that did keeps it fresh and to one use.
        challenge = bytes.fromhex(args.challenge)
        verifier.adopt_challenge(challenge)
        signature = Path(args.signature).read_bytes()
    else:
        raise ValueError("proof of possession needs --key, or --challenge and --signature")
    decision = verifier.verify(certs[0], intermediates, challenge, signature)
    print(decision)
    return 0 if decision.granted else 1


def _ca_verification_cert(args: argparse.Namespace) -> int:
    from ca_daemon import app
    from ca_daemon import config as config_module
    from ca_daemon.authority import load_active_ca
    from ca_daemon.cli_access import operator_actor
    from ca_daemon.registration import VerificationCertificates

    config = config_module.load(args.config)
    with app.connected(config) as (hsm, store):
        active = load_active_ca(config, hsm, store)
        actor = operator_actor()
        result = VerificationCertificates(hsm, store, lambda: active).issue(args.code, timedelta(days=args.validity_days), actor)
    _write_certificates(Path(args.out), [result.certificate], _format_for(args.out))
    print(f"wrote verification certificate {result.serial} (CN={args.code}, signed by CA key {result.issuer_key_id}) to {args.out}")
    return 0


def _crl_publish(args: argparse.Namespace) -> int:
    from ca_daemon import app
    from ca_daemon import config as config_module
    from ca_daemon.revocation import CrlPublisher

    config = config_module.load(args.config)
    if args.delta and not config.crl.delta:
        raise CaError("delta CRLs are off ([crl] delta = false): none is published; publish a full CRL (without --delta)")
    with app.connected(config) as (hsm, store):
        publisher = CrlPublisher(config, hsm, store)
        issuers = publisher.issuers(datetime.now(UTC))
        if not issuers:
            raise CaError("no CA key with a valid certificate; nothing to publish")
        # After the clock was ahead both kinds are replaced: a delta must not be dated before its base, nor after the next
        # delta. With deltas off only the full CRL is: a delta would be stored that nothing hands out.
        kinds = ((False, True) if config.crl.delta else (False,)) if args.clock_was_ahead else (args.delta,)
        for issuer in issuers:
            for delta in kinds:
                crl = hsm.run(
                    lambda issuer=issuer, delta=delta: publisher.publish(issuer, delta=delta, clock_was_ahead=args.clock_was_ahead)  # type: ignore[misc]
                )
                kind = "delta" if crl.is_delta else "full"
                dated = crl.this_update.isoformat()
                print(f"published {kind} CRL {crl.crl_number} of {issuer.key_id} ({crl.entries} entries), thisUpdate {dated}")
    print("GetCRL returns it now; a running daemon also serves it over HTTP within its crl.check_interval")
    return 0


def _crl_raise_number(args: argparse.Namespace) -> int:
    from ca_daemon import cli_store

    return cli_store.raise_crl_number(args.config, args.issuer, args.above)


ON_CHANGE_TIMEOUT_S = 120.0  # `crl fetch --on-change`: a reload that hangs is killed, and counts as failed


def _crl_fetch(args: argparse.Namespace) -> int:
    import shlex
    import subprocess

    from ca_daemon.crlfile import CrlRefused, refresh

    out = Path(args.out)
    trusted = x509.load_pem_x509_certificates(Path(args.trust).read_bytes())
    command = shlex.split(args.on_change)

    def run_on_change() -> None:
        try:
            result = subprocess.run(command, check=False, timeout=ON_CHANGE_TIMEOUT_S)  # its output goes where ours does (the journal)
        except subprocess.TimeoutExpired:  # subprocess.run has killed it
            raise CrlRefused(
                f"{out} changed but `{args.on_change}` did not finish within {ON_CHANGE_TIMEOUT_S:g} s and was killed: the file has "
                "its previous content back, and the next run installs it and tries again"
            ) from None
        if result.returncode != 0:
            raise CrlRefused(
                f"{out} changed but `{args.on_change}` exited with status {result.returncode}: the file has its previous "
                "content back, and the next run installs it and tries again"
            )

    refreshed = refresh(args.url, trusted, out, datetime.now(UTC), reload=run_on_change if command else None)
    for item in refreshed.crls:
        print(item.describe())
    if not refreshed.changed:
        print(f"{out} already holds these CRLs: left as it was")
    else:
        print(f"installed {len(refreshed.crls)} CRL(s) in {out}" + (f"; ran `{args.on_change}`" if command else ""))
    return 0


def _format_for(path: str) -> str:
    return "der" if path.endswith((".der", ".cer")) else "pem"


def _write_certificates(path: Path, certs: list[x509.Certificate], fmt: str) -> None:
    if fmt == "der":
        write_atomically(path, certs[0].public_bytes(serialization.Encoding.DER))  # DER holds one certificate
    else:
        write_atomically(path, b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs))


__all__ = ["DEFAULT_TARGET", "TARGET_HELP", "add_client_commands", "add_client_options", "add_commands", "client_from_args", "unreachable"]


def pem_certificates(option: str, path: str) -> list[x509.Certificate]:
    """The certificates of a PEM file given as option. A file with none (the parent CA's answer in DER, the CSR, an
    empty file) failed with cryptography's "Unable to load PEM file. See https://... MalformedFraming", naming neither
    the option nor the file."""
    data = Path(path).read_bytes()
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        if b"-----BEGIN CERTIFICATE-----" in data:  # a certificate there that does not parse: cryptography's reason
            raise ValueError(f"{option} {path}: {exc}") from None
    try:
        x509.load_der_x509_certificate(data)
    except ValueError:
        what = ": it is empty" if not data.strip() else ""
        if b"CERTIFICATE REQUEST" in data:
            what = ": it is a certificate signing request, not the certificate made from it"
        raise ValueError(f"{option} {path} holds no PEM certificate (-----BEGIN CERTIFICATE-----){what}") from None
    pem = Path(path).with_suffix(".pem") if not path.endswith(".pem") else Path(f"{path}.pem")
    raise ValueError(f"{option} {path} is a DER certificate; give it as PEM: openssl x509 -inform der -in {path} -out {pem}")
