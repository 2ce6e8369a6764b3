"""`ca-daemon key ...` ceremony commands: CA key rotation over the KeyCeremony RPCs.

These commands talk to the running daemon rather than to the token and store: the
daemon knows who is asking from the officer's mTLS client certificate, and dual control
("two distinct officers") means two distinct certificate identities. (`key generate` and
`key list` still act on the token and store directly, as before.)
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC
from pathlib import Path

import grpc
from cryptography.hazmat.primitives import serialization

from ca_daemon._proto.ca_daemon.v1 import ca_pb2, ca_pb2_grpc
from ca_daemon.authority import unfinished_emergency_notice
from ca_daemon.cli_factory import TARGET_HELP, pem_certificates, positive_seconds, whole_number
from ca_daemon.client import TlsOptions
from ca_daemon.model import KeySpec


def add_commands(key: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = key.add_parser("create", help="generate a CA key in the token via the daemon (GenerateKey, officer)")
    p.add_argument("--label", required=True, help="CKA_LABEL of the new key; also its key ID")
    p.add_argument(
        "--type", default="ec-p256", choices=[s.value for s in KeySpec], help="key type (default ec-p256); the token must offer it"
    )
    _options(p)
    p.set_defaults(handler=_create)

    p = key.add_parser("self-sign", help="make a pending key a self-signed root, with link certificates to the active root")
    p.add_argument("--key-id", required=True, help="the pending key to certify (`ca-daemon key status`)")
    p.add_argument("--subject", required=True, help="RFC 4514 subject, e.g. 'CN=Factory Root CA 2,O=Example'")
    p.add_argument(
        "--validity-days", type=whole_number(1, 36500, " days"), default=3650, help="validity of the root certificate (default 3650 days)"
    )
    p.add_argument("--out", default="", help="also write the certificate and link certificates (PEM) here")
    _options(p)
    p.set_defaults(handler=_self_sign)

    p = key.add_parser("csr", help="write a CSR of a pending key for the parent CA (GetKeyCSR)")
    p.add_argument("--key-id", required=True, help="the pending key to certify (`ca-daemon key status`)")
    p.add_argument("--subject", required=True, help="RFC 4514 subject, e.g. 'CN=Factory CA 2,O=Example'")
    p.add_argument("--out", required=True, help="where to write the CSR (PEM)")
    _options(p)
    p.set_defaults(handler=_csr)

    p = key.add_parser("install-cert", help="install the parent's certificate of a pending key and publish it")
    p.add_argument("--key-id", required=True, help="the pending key the certificate is for")
    p.add_argument("--cert", required=True, help="PEM: the certificate, optionally followed by its parents")
    _options(p)
    p.set_defaults(handler=_install)

    p = key.add_parser(
        "approve", help="approve activate/retire/destroy/emergency of a key; the second distinct officer's approval executes it"
    )
    p.add_argument("action", choices=["activate", "retire", "destroy", "emergency"], help="the life-cycle step to approve")
    p.add_argument("--key-id", required=True, help="the key acted on (for emergency: the compromised key)")
    p.add_argument("--successor", default="", help="emergency only: the pending key to switch to")
    _options(p)
    p.set_defaults(handler=_approve)

    p = key.add_parser("status", help="CA keys with status and life-cycle times, from the daemon (ListKeys)")
    _options(p)
    p.set_defaults(handler=_status)


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="", help=TARGET_HELP)
    p.add_argument("--tls-ca", default="", help="CA bundle (PEM) of the daemon's server certificate; enables mTLS")
    p.add_argument("--tls-cert", default="", help="the officer's client certificate (PEM)")
    p.add_argument("--tls-key", default="", help="the officer's private key (PEM)")
    p.add_argument("--tls-server-name", default="", help="name to check in the server certificate")
    p.add_argument("--timeout", type=positive_seconds, default=60.0, help="seconds per call (default 60)")


def _stub(args: argparse.Namespace) -> tuple[grpc.Channel, ca_pb2_grpc.KeyCeremonyStub]:
    target = args.target  # cli.main filled in the default
    if args.tls_ca:
        tls = TlsOptions(args.tls_ca, args.tls_cert or None, args.tls_key or None, args.tls_server_name)
        options = [("grpc.ssl_target_name_override", tls.server_name)] if tls.server_name else []
        channel = grpc.secure_channel(target, tls.credentials(), options=options)
    else:
        channel = grpc.insecure_channel(target)
    return channel, ca_pb2_grpc.KeyCeremonyStub(channel)


def _create(args: argparse.Namespace) -> int:
    channel, stub = _stub(args)
    with channel:
        reply = stub.GenerateKey(ca_pb2.GenerateKeyRequest(label=args.label, key_type=args.type), timeout=args.timeout)
    print(reply.pkcs11_uri)
    return 0


def _self_sign(args: argparse.Namespace) -> int:
    channel, stub = _stub(args)
    with channel:
        request = ca_pb2.SelfSignKeyRequest(key_id=args.key_id, subject=args.subject, validity_days=args.validity_days)
        reply = stub.SelfSignKey(request, timeout=args.timeout)
    if args.out:
        Path(args.out).write_text(reply.certificate_pem + "".join(reply.link_certificates_pem))
    print(f"self-signed root installed and published for {args.key_id}; {len(reply.link_certificates_pem)} link certificate(s)")
    return 0


def _csr(args: argparse.Namespace) -> int:
    channel, stub = _stub(args)
    with channel:
        reply = stub.GetKeyCSR(ca_pb2.GetKeyCSRRequest(key_id=args.key_id, subject=args.subject), timeout=args.timeout)
    Path(args.out).write_text(reply.csr_pem)
    print(f"wrote {args.out}")
    return 0


def _install(args: argparse.Namespace) -> int:
    channel, stub = _stub(args)
    with channel:
        certificates = pem_certificates("--cert", args.cert)
        pem = "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in certificates)
        request = ca_pb2.InstallKeyCertificateRequest(key_id=args.key_id, certificate_pem=pem)
        stub.InstallKeyCertificate(request, timeout=args.timeout)
    print(f"certificate installed and published for {args.key_id}")
    return 0


def _approve(args: argparse.Namespace) -> int:
    # Checked before the daemon is dialled, in the command's own terms (the daemon names the RPC's field).
    if args.action == "emergency" and not args.successor:
        raise ValueError("key approve emergency needs --successor KEY: the pending key to switch to")
    if args.action != "emergency" and args.successor:
        raise ValueError(f"--successor is for key approve emergency only, not {args.action}")
    channel, stub = _stub(args)
    with channel:
        request = ca_pb2.ApproveKeyActionRequest(action=args.action, key_id=args.key_id, successor_key_id=args.successor)
        reply = stub.ApproveKeyAction(request, timeout=args.timeout)
    print(reply.message)
    print(f"officers: {', '.join(reply.officers)}", file=sys.stderr)
    return 0


def _status(args: argparse.Namespace) -> int:
    channel, stub = _stub(args)
    with channel:
        reply = stub.ListKeys(ca_pb2.ListKeysRequest(), timeout=args.timeout)
    for key in reply.keys:
        times = [
            f"{name}={getattr(key, name).ToDatetime().isoformat()}Z"
            for name in (
                "published_at",
                "activatable_at",
                "activated_at",
                "superseded_at",
                "retired_at",
                "destroyed_at",
                "compromised_at",
                "halted_at",
            )
            if key.HasField(name)
        ]
        fields = [key.key_id, key.key_type, key.status, " ".join(times)]
        if key.HasField("halted_at") and not key.HasField("compromised_at"):  # an emergency that did not complete
            halted_at = key.halted_at.ToDatetime(UTC)
            notice = unfinished_emergency_notice(key.key_id, halted_at, key.emergency_successor_key_id, active=key.status == "active")
            fields.append("HALTED " + notice)
        print("\t".join(fields))
    return 0
