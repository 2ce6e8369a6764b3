"""Issue 7: the key ceremony use cases (rotation.KeyCeremony) on a real token and database, without a server.

Covers what the life-cycle test in tests/e2e/test_rotation.py does not: approvals lapse
after the window, one identity never counts twice, the emergency switch revokes the whole
compromised generation (leaves on its own CRL, the link certificates that certify it on
their issuers' CRLs), an intermediate key installed from a parent's answer, and refusals.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import sqlite3
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from sqlalchemy import text

from ca_daemon import app, config, issuer
from ca_daemon import authority as authority_module
from ca_daemon import rotation as rotation_module
from ca_daemon._proto.ca_daemon.v1 import ca_pb2, ca_pb2_grpc
from ca_daemon.authority import Authority
from ca_daemon.config import RotationConfig
from ca_daemon.errors import CaKeyChanged, FailedPrecondition, InvalidRequest, NotFound, PermissionDenied
from ca_daemon.hsm import Hsm, Pkcs11Uri
from ca_daemon.model import AuditEvent, CertificateRequest, KeySpec, KeyStatus, RevocationReason
from ca_daemon.revocation import CrlPublisher, Revocations
from ca_daemon.rotation import ApprovalResult, KeyCeremony
from ca_daemon.store import SqlStore, serial_hex
from ca_daemon.store.rotation_store import RotationStore
from tests.conftest import CA_DAEMON, CaEnv, Daemon, at_once, daemon_environment, device_csr, make_env, openssl_verify
from tests.integration.crl_helpers import crl_env, start


@dataclasses.dataclass
class Setup:
    config: config.Config
    hsm: Hsm
    store: SqlStore
    authority: Authority
    env: CaEnv

    def ceremony(self, window_s: float = 60, prepublication_s: float = 0) -> KeyCeremony:
        rotation = RotationConfig(approval_window=timedelta(seconds=window_s), prepublication=timedelta(seconds=prepublication_s))
        return KeyCeremony(dataclasses.replace(self.config, rotation=rotation), self.hsm, self.store)

    def sign(self) -> int:
        request = CertificateRequest(csr=device_csr(), profile="", request_id=str(uuid.uuid4()), caller="local-developer")
        return asyncio.run(self.authority.sign(request)).certificate.serial

    def follow(self) -> None:
        asyncio.run(self.authority.follow_active_key())

    def new_root(self, ceremony: KeyCeremony, label: str) -> None:
        ceremony.generate("alice", KeySpec.EC_P256, label)
        ceremony.self_sign("alice", label, issuer.parse_subject(f"CN={label}"), timedelta(days=30))


@pytest.fixture
def setup(tmp_path: Path, softhsm_conf: Path) -> Iterator[Setup]:
    env = make_env(tmp_path, softhsm_conf)
    cfg = config.load(env.config_path)
    hsm = app.connect_hsm(cfg)
    store = app.connect_store(cfg)
    authority = Authority.load(cfg, hsm, store)
    try:
        yield Setup(cfg, hsm, store, authority, env)
    finally:
        authority.close()
        store.close()
        hsm.close()


def test_approvals_lapse_after_the_window_and_one_identity_counts_once(setup: Setup) -> None:
    ceremony = setup.ceremony(window_s=2)
    setup.new_root(ceremony, "root-2")
    assert not ceremony.approve("alice", "activate", "root-2").executed
    assert not ceremony.approve("alice", "activate", "root-2").executed  # the same identity again
    time.sleep(3.2)  # approval times are whole seconds
    late = ceremony.approve("bob", "activate", "root-2")
    assert not late.executed and late.officers == ("bob",)  # alice's approvals lapsed
    assert setup.store.get_ca_key("root-2").status == KeyStatus.PENDING  # type: ignore[union-attr]
    done = ceremony.approve("alice", "activate", "root-2")
    assert done.executed and done.officers == ("alice", "bob")
    assert setup.store.active_key_id() == "root-2"
    setup.follow()
    assert setup.authority.active.key.key_id == "root-2"
    # Consumed: the same approvals do not run a second action.
    assert RotationStore(setup.store).live_officers("activate", "root-2", "", datetime.now(UTC), timedelta(seconds=60)) == []


def test_prepublication_period_and_links_are_required(setup: Setup) -> None:
    ceremony = setup.ceremony(prepublication_s=3600)
    setup.new_root(ceremony, "root-2")
    with pytest.raises(FailedPrecondition, match="pre-published"):
        ceremony.approve("alice", "activate", "root-2")
    # A root made outside the ceremony (no link certificates) cannot be activated over an active root.
    no_links = setup.ceremony()
    no_links.generate("alice", KeySpec.EC_P256, "root-3")
    key = setup.store.get_ca_key("root-3")
    assert key is not None
    from ca_daemon import authority

    authority.self_sign_root(setup.hsm, setup.store, key, issuer.parse_subject("CN=root-3"), timedelta(days=30))
    RotationStore(setup.store).mark_published("root-3", datetime.now(UTC) - timedelta(days=1))
    with pytest.raises(FailedPrecondition, match="link certificates"):
        no_links.approve("alice", "activate", "root-3")


def test_refusals_record_nothing_but_their_audit_event(setup: Setup) -> None:
    """A refused step changes nothing, counts no approval, and is audited (before, only the request log saw it)."""
    ceremony = setup.ceremony(prepublication_s=3600)
    with pytest.raises(PermissionDenied):
        ceremony.approve("", "activate", "ca-root-1")
    with pytest.raises(InvalidRequest):
        ceremony.approve("alice", "rotate", "ca-root-1")
    with pytest.raises(FailedPrecondition, match="active key"):
        ceremony.approve("alice", "retire", "ca-root-1")
    with pytest.raises(FailedPrecondition, match="only a retired key"):
        ceremony.approve("mallory", "destroy", "ca-root-1")
    with pytest.raises(FailedPrecondition, match="exists already"):
        ceremony.generate("alice", KeySpec.EC_P256, "ca-root-1")
    with pytest.raises(FailedPrecondition, match="installed once"):
        ceremony.self_sign("alice", "ca-root-1", issuer.parse_subject("CN=again"), timedelta(days=30))
    setup.new_root(ceremony, "root-2")
    with pytest.raises(FailedPrecondition, match="pre-published"):
        ceremony.approve("bob", "activate", "root-2")
    assert RotationStore(setup.store).live_officers("activate", "root-2", "", datetime.now(UTC), timedelta(seconds=60)) == []
    assert setup.store.active_key_id() == "ca-root-1"
    events = [e for e in setup.store.audit_events() if e["action"].startswith("key.") and e["outcome"] == "refused"]
    seen = [(e["action"], e["actor"], e["key_id"], e["reason"], json.loads(e["details"]).get("action", "")) for e in events]
    assert seen == [
        ("key.approve", "-", "ca-root-1", "role", "activate"),
        ("key.approve", "alice", "ca-root-1", "action", "rotate"),
        ("key.approve", "alice", "ca-root-1", "key-status", "retire"),
        ("key.approve", "mallory", "ca-root-1", "key-status", "destroy"),
        ("key.generate", "alice", "ca-root-1", "label", ""),
        ("key.certificate", "alice", "ca-root-1", "key-status", ""),
        ("key.approve", "bob", "root-2", "prepublication", "activate"),
    ]
    assert "only a retired key can be destroyed" in json.loads(events[3]["details"])["message"]
    assert [e for e in setup.store.audit_events() if e["outcome"] == "approved"] == []


def test_emergency_revokes_the_generation_and_switches_at_once(setup: Setup) -> None:
    ceremony = setup.ceremony()
    setup.new_root(ceremony, "root-2")
    ceremony.approve("alice", "activate", "root-2")
    ceremony.approve("bob", "activate", "root-2")
    setup.follow()
    leaves = [setup.sign() for _ in range(3)]
    setup.new_root(ceremony, "root-3")  # links root-2 <-> root-3
    rotation = RotationStore(setup.store)
    certifying_2 = {c.issuer_key_id: c.serial for c in rotation.links_certifying("root-2")}
    assert set(certifying_2) == {"ca-root-1", "root-3"}

    first = ceremony.approve("alice", "emergency", "root-2", "root-3")
    assert not first.executed
    assert all(setup.store.get_revocation(s) is None for s in leaves)  # one officer: nothing revoked

    done = ceremony.approve("bob", "emergency", "root-2", "root-3")
    assert done.executed, done
    assert setup.store.active_key_id() == "root-3"
    assert setup.store.get_ca_key("root-2").status == KeyStatus.SUPERSEDED  # type: ignore[union-attr]
    assert rotation.lifecycle("root-2").get("compromised_at") is not None
    for serial in leaves:
        revocation = setup.store.get_revocation(serial)
        assert revocation is not None and revocation.reason == RevocationReason.CA_COMPROMISE
    for parent, serial in certifying_2.items():
        revocation = setup.store.get_revocation(serial)
        assert revocation is not None and revocation.issuer_key_id == parent and revocation.reason == RevocationReason.KEY_COMPROMISE

    # Each CRL says so: root-2's lists its leaves, root-3's and ca-root-1's the link certifying root-2.
    publisher = CrlPublisher(setup.config, setup.hsm, setup.store)
    for key_id, expected in (("root-2", set(leaves)), ("root-3", {certifying_2["root-3"]}), ("ca-root-1", {certifying_2["ca-root-1"]})):
        key = setup.store.get_ca_key(key_id)
        assert key is not None
        crl = x509.load_der_x509_crl(publisher.publish(publisher.issuer_of(key), delta=False).der)
        assert expected <= {e.serial_number for e in crl}, key_id
        # These keys issued link (CA) certificates: their CRLs must not narrow their scope to user certificates.
        with pytest.raises(x509.ExtensionNotFound):
            crl.extensions.get_extension_for_class(x509.IssuingDistributionPoint)

    setup.follow()
    assert setup.authority.active.key.key_id == "root-3"
    assert setup.store.get_certificate(setup.sign()).issuer_key_id == "root-3"  # type: ignore[union-attr]
    # Every certificate root-2 signed is revoked, so it can retire at once (final CRL).
    ceremony.approve("alice", "retire", "root-2")
    assert ceremony.approve("bob", "retire", "root-2").executed
    assert setup.store.get_ca_key("root-2").status == KeyStatus.RETIRED  # type: ignore[union-attr]


def test_an_intermediate_key_from_the_parents_answer(setup: Setup) -> None:
    ceremony = setup.ceremony()
    ceremony.generate("alice", KeySpec.EC_P256, "sub-2")
    csr = x509.load_pem_x509_csr(ceremony.csr("alice", "sub-2", issuer.parse_subject("CN=Factory CA 2")))
    parent_key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    parent = issuer.build_root(issuer.parse_subject("CN=Outside Root"), parent_key.public_key(), now, timedelta(days=30))
    parent_cert = parent.sign(parent_key, hashes.SHA256())
    answer = (
        x509.CertificateBuilder()
        .subject_name(csr.subject)
        .issuer_name(parent_cert.subject)
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=10))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(parent_key, hashes.SHA256())
    )
    ceremony.install("alice", "sub-2", answer, [parent_cert])
    info = next(i for i in ceremony.list_keys() if i.key.key_id == "sub-2")
    assert info.key.status == KeyStatus.PENDING and info.lifecycle.get("published_at") is not None
    with pytest.raises(FailedPrecondition, match="installed once"):
        ceremony.install("bob", "sub-2", answer, [parent_cert])
    ceremony.approve("alice", "activate", "sub-2")
    assert ceremony.approve("bob", "activate", "sub-2").executed  # not both roots: no links needed
    setup.follow()
    serial = setup.sign()
    leaf = x509.load_der_x509_certificate(setup.store.get_certificate(serial).der)  # type: ignore[union-attr]
    leaf.verify_directly_issued_by(answer)


class _Crash(BaseException):
    """The process dying where it is raised: nothing after it runs, nothing catches it."""


def _emergency_dies_after_the_halt(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two officers approve the emergency of ca-root-1 for a new root-2, and the process dies right after the halt."""
    ceremony = setup.ceremony()
    setup.new_root(ceremony, "root-2")
    ceremony.approve("alice", "emergency", "ca-root-1", "root-2")
    listing = RotationStore.unexpired_unrevoked

    def die(self: RotationStore, *args: Any, **kwargs: Any) -> list[int]:
        raise _Crash  # the revocation pass is the step after the halt

    monkeypatch.setattr(RotationStore, "unexpired_unrevoked", die)
    with pytest.raises(_Crash):
        ceremony.approve("bob", "emergency", "ca-root-1", "root-2")
    monkeypatch.setattr(RotationStore, "unexpired_unrevoked", listing)


def test_an_emergency_halts_the_key_first_and_one_that_dies_before_the_switch_is_completed_by_a_retry(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The emergency revoked the compromised key's certificates while it still signed: what a worker committed during that
    pass was handed out and revoked moments later. Now the key is halted first, in a transaction of its own that leaves
    the approvals live, so a process that dies after it leaves nothing signed with the key, and the officers' retry
    completes the emergency."""
    before = [setup.sign() for _ in range(2)]
    _emergency_dies_after_the_halt(setup, monkeypatch)

    # Halted: the worker's certificate is discarded at commit, and its caller told why and to retry.
    with pytest.raises(CaKeyChanged) as refused:
        setup.sign()
    assert refused.value.rule == "ca-key-compromised" and "issuance resumes once the successor key is active" in refused.value.message
    assert setup.authority.active.key.key_id == "ca-root-1" and setup.store.active_key_id() == "ca-root-1"
    rotation = RotationStore(setup.store)
    assert rotation.live_officers("emergency", "ca-root-1", "root-2", datetime.now(UTC), timedelta(seconds=60)) == ["alice", "bob"]
    assert all(setup.store.get_revocation(s) is None for s in before)

    # The retry (a restarted worker's ceremony) completes it.
    done = setup.ceremony().approve("bob", "emergency", "ca-root-1", "root-2")
    assert done.executed, done
    assert setup.store.active_key_id() == "root-2"
    for serial in before:
        revocation = setup.store.get_revocation(serial)
        assert revocation is not None and revocation.reason == RevocationReason.CA_COMPROMISE
    assert rotation.unexpired_unrevoked("ca-root-1", datetime.now(UTC)) == []
    setup.follow()
    assert setup.store.get_certificate(setup.sign()).issuer_key_id == "root-2"  # type: ignore[union-attr]
    steps = [e["outcome"] for e in setup.store.audit_events() if e["action"] == "key.emergency"]
    assert steps == ["halted", "halted", "executed"]


def test_a_key_an_emergency_halted_shows_so_in_key_list_key_status_the_rpcs_and_the_log(
    setup: Setup, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """An emergency that died after the halt left ca-root-1 active but halted: every Sign refused, while `key list`,
    `key status`, ListKeys and GetCACertificates showed a plain active key and the log said nothing."""
    _emergency_dies_after_the_halt(setup, monkeypatch)
    retry = "ca-daemon key approve emergency --key-id ca-root-1 --successor root-2"

    listed = [line for line in setup.env.cli("key", "list").stdout.splitlines() if line.startswith("ca-root-1\t")]
    assert len(listed) == 1 and listed[0].split("\t")[2] == "active", listed
    assert "HALTED by an emergency since" in listed[0] and "issuance is stopped" in listed[0] and retry in listed[0], listed
    halted_at = setup.store.get_ca_key("ca-root-1").halted_at  # type: ignore[union-attr]
    assert halted_at is not None
    since = halted_at.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert f"HALTED by an emergency since {since}" in listed[0], listed

    daemon = Daemon(setup.env, tmp_path / "daemon.log").start()
    try:
        status = [line for line in setup.env.cli("key", "status").stdout.splitlines() if line.startswith("ca-root-1\t")]
        assert len(status) == 1 and f"HALTED by an emergency since {since}" in status[0] and retry in status[0], status
        with grpc.insecure_channel(setup.env.target) as channel:
            keys = {k.key_id: k for k in ca_pb2_grpc.KeyCeremonyStub(channel).ListKeys(ca_pb2.ListKeysRequest(), timeout=10).keys}
            assert keys["ca-root-1"].status == "active" and keys["ca-root-1"].halted_at.ToDatetime(UTC) == halted_at
            assert keys["ca-root-1"].emergency_successor_key_id == "root-2"
            assert not keys["root-2"].HasField("halted_at") and keys["root-2"].emergency_successor_key_id == ""
            reply = ca_pb2_grpc.CertificateAuthorityStub(channel).GetCACertificates(ca_pb2.GetCACertificatesRequest(), timeout=10)
            certificates = {c.key_id: c for c in reply.certificates}
            assert certificates["ca-root-1"].status == "active" and certificates["ca-root-1"].halted_at.ToDatetime(UTC) == halted_at
            assert not certificates["root-2"].HasField("halted_at")
        # Logged at start, then at most once a minute however often the worker polls (every second here).
        deadline = time.monotonic() + 10
        while "issuance is stopped" not in daemon.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(2.5)
        warnings = [json.loads(line) for line in daemon.log().splitlines() if "halted by an emergency" in line]
        assert len(warnings) == 1, warnings
        assert warnings[0]["level"] == "WARNING" and "ca-root-1" in warnings[0]["msg"] and since in warnings[0]["msg"]
        assert "issuance is stopped until the emergency completes" in warnings[0]["msg"] and retry in warnings[0]["msg"]
    finally:
        daemon.stop()

    # The retry completes the emergency: the key is no longer shown halted (its halt time stays on record).
    assert setup.ceremony().approve("bob", "emergency", "ca-root-1", "root-2").executed
    listed = [line for line in setup.env.cli("key", "list").stdout.splitlines() if line.startswith("ca-root-1\t")]
    assert listed[0].split("\t")[2] == "superseded" and "HALTED" not in listed[0], listed


@pytest.mark.parametrize(
    ("later_lists", "switcher"),
    [
        ("links", "later"),  # the interleaving a full run hit once, forced
        ("everything", "later"),
        ("links", "earlier"),
    ],
)
def test_two_executions_of_one_emergency_at_once_revoke_everything_once_and_one_switches(
    setup: Setup, monkeypatch: pytest.MonkeyPatch, later_lists: str, switcher: str
) -> None:
    """carol approved; alice and bob approve at the same moment (two workers): both halt the key, the earlier execution
    revokes everything before the later one lists the links certifying the key (later_lists "links": both listed the
    key's certificates before either revoked; the interleaving a full run once hit by chance) or anything at all
    ("everything"), and the switcher switches while the other is refused at the switch.

    The second one's revocation used to be refused ("already revoked"), and its officer told the emergency failed
    while the other execution completed it. Then a later execution that switched told its officer, and audited, only
    what it revoked itself or found revoked in its own lists: "4 certificate(s) it signed and 0 link certificate(s)"
    (or 0 and 0), though the emergency had revoked 4 and 1. Now the officer told it executed is told what the emergency
    revoked, and how much of that the other execution did; the executed event records both."""
    leaves = [setup.sign() for _ in range(3)]
    setup.new_root(setup.ceremony(), "root-2")
    setup.ceremony().approve("carol", "emergency", "ca-root-1", "root-2")
    halt, listing, certifying, execute = (
        RotationStore.halt,
        RotationStore.unexpired_unrevoked,
        RotationStore.links_certifying,
        RotationStore.execute,
    )
    both_halted, both_listed = threading.Barrier(2, timeout=30), threading.Barrier(2, timeout=30)
    executions: list[int] = []  # the two executions' threads, in the order they reached the gate
    listed: set[int] = set()
    gate_order = threading.Lock()
    earlier_done = threading.Event()  # the earlier execution revoked all it found (and switched, if it is the switcher)
    later_switched = threading.Event()

    def gate() -> None:
        """The first execution here goes on; the other waits until the first has revoked all it found."""
        with gate_order:
            if threading.get_ident() in executions or len(executions) == 2:
                return
            executions.append(threading.get_ident())
            later = len(executions) == 2
        if later:
            assert earlier_done.wait(30), "the earlier execution did not reach the switch"

    def halt_then_wait(self: RotationStore, *args: Any, **kwargs: Any) -> bool:
        halted = halt(self, *args, **kwargs)
        both_halted.wait()  # both are past the halt: neither is refused there by the other's switch
        return halted

    def list_certificates(self: RotationStore, *args: Any, **kwargs: Any) -> list[int]:
        if later_lists == "everything":
            gate()
            return listing(self, *args, **kwargs)
        serials = listing(self, *args, **kwargs)
        with gate_order:
            first_pass = threading.current_thread() is not threading.main_thread() and threading.get_ident() not in listed
            listed.add(threading.get_ident())
        if first_pass:
            both_listed.wait()  # each execution's first pass: both listed before either revokes
        return serials

    def list_links(self: RotationStore, subject_key_id: str) -> list[Any]:
        if later_lists == "links":
            gate()
        return certifying(self, subject_key_id)

    def switch(self: RotationStore, *args: Any, **kwargs: Any) -> None:
        earlier = threading.get_ident() == executions[0]
        if earlier and switcher == "later":
            earlier_done.set()
            assert later_switched.wait(30), "the later execution did not switch"
            execute(self, *args, **kwargs)  # refused: the later one consumed the approvals
            return
        try:
            execute(self, *args, **kwargs)
        finally:
            (earlier_done if earlier else later_switched).set()

    monkeypatch.setattr(RotationStore, "halt", halt_then_wait)
    monkeypatch.setattr(RotationStore, "unexpired_unrevoked", list_certificates)
    monkeypatch.setattr(RotationStore, "links_certifying", list_links)
    monkeypatch.setattr(RotationStore, "execute", switch)
    officers = iter(["alice", "bob"])
    officer_of: dict[int, str] = {}

    def approve() -> ApprovalResult:
        officer_of[threading.get_ident()] = officer = next(officers)
        return setup.ceremony().approve(officer, "emergency", "ca-root-1", "root-2")

    outcomes = at_once(approve)
    assert len(outcomes) == 2 and all(isinstance(o, ApprovalResult) for o in outcomes), outcomes
    results = [o for o in outcomes if isinstance(o, ApprovalResult)]
    assert sorted(r.executed for r in results) == [False, True]
    other = next(r for r in results if not r.executed)
    assert "a concurrent approval executed it" in other.message and "root-2 is active" in other.message, other.message
    assert setup.store.active_key_id() == "root-2"
    events = setup.store.audit_events()
    revoked = [int(e["serial"], 16) for e in events if e["action"] == "certificate.revoke"]
    links = {c.serial for c in RotationStore(setup.store).links_certifying("ca-root-1")}
    assert len(revoked) == len(set(revoked)) and {*leaves, *links} <= set(revoked)  # each once, by one execution or the other
    earlier, later = (officer_of[thread] for thread in executions)
    assert {e["actor"] for e in events if e["action"] == "certificate.revoke"} == {earlier}  # the interleaving was forced
    assert RotationStore(setup.store).unexpired_unrevoked("ca-root-1", datetime.now(UTC), leaves_only=False) == []
    executed = next(r for r in results if r.executed)
    # The emergency revoked the 3 leaves and the link ca-root-1 signed (certifying root-2), and the link certifying it.
    by_the_other = " (4 and 1 of them by another execution of this emergency or a Revoke)" if switcher == "later" else ""
    assert executed.message == (
        f"CA key ca-root-1 is compromised: 4 certificate(s) it signed and 1 link certificate(s) certifying it are revoked{by_the_other}; "
        "root-2 is active"
    ), executed.message
    (switched,) = [e for e in events if e["action"] == "key.emergency" and e["outcome"] == "executed"]
    assert switched["actor"] == (later if switcher == "later" else earlier)
    details = json.loads(switched["details"])
    own = ("0", "0") if switcher == "later" else ("4", "1")
    meanwhile = {"links": "4", "everything": "0"}[later_lists] if switcher == "later" else "0"
    assert (details["revoked_certificates"], details["revoked_link_certificates"], details["revoked_meanwhile"]) == (*own, meanwhile)
    assert (details["total_revoked_certificates"], details["total_revoked_link_certificates"]) == ("4", "1"), details
    for serial in leaves:
        revocation = setup.store.get_revocation(serial)
        assert revocation is not None and revocation.reason == RevocationReason.CA_COMPROMISE
    steps = sorted(e["outcome"] for e in events if e["action"] == "key.emergency")
    assert steps == ["executed", "halted", "halted"]
    assert [e for e in events if e["outcome"] == "refused"] == []


def test_an_emergency_revokes_a_big_generation_in_transactions_of_bounded_size(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each revocation pass ran as one transaction: a key of a million devices held every revocation row and audit
    event of it in memory at once. Now a transaction revokes at most _REVOCATIONS_PER_TRANSACTION (2 here), each
    durable on its own; every revocation commit takes the issuer's next change number, which counts them."""
    monkeypatch.setattr(rotation_module, "_REVOCATIONS_PER_TRANSACTION", 2, raising=False)
    leaves = [setup.sign() for _ in range(5)]
    setup.new_root(setup.ceremony(), "root-2")
    _both(setup.ceremony(), "emergency", "ca-root-1", "root-2")
    with setup.store.engine.connect() as conn:
        numbers = {
            serial: seq
            for serial, seq in conn.execute(text("SELECT serial, change_seq FROM revocations WHERE issuer_key_id = 'ca-root-1'"))
        }
    assert {int(serial, 16) for serial in numbers} >= set(leaves)
    assert len(set(numbers.values())) >= 3, numbers  # the 5 leaves (and the root-2 link OLD signed) in parts of 2
    for serial in leaves:
        revocation = setup.store.get_revocation(serial)
        assert revocation is not None and revocation.reason == RevocationReason.CA_COMPROMISE


def _both(ceremony: KeyCeremony, action: str, key_id: str, successor: str = "") -> str:
    ceremony.approve("alice", action, key_id, successor)
    result = ceremony.approve("bob", action, key_id, successor)
    assert result.executed, result
    return result.message


def test_retirement_revokes_the_links_the_key_issued_on_its_final_crl(setup: Setup) -> None:
    """A retired root can revoke nothing more, so the link it issued for its successor is withdrawn when it retires.

    The link used to stay valid and unrevoked: when the successor was later compromised, the
    emergency switch recorded the link's revocation, but no CRL of the retired root ever
    carried it, and whoever trusted only that root kept accepting the compromised chain.
    """
    ceremony = setup.ceremony()
    setup.new_root(ceremony, "root-2")  # links ca-root-1 <-> root-2
    _both(ceremony, "activate", "root-2")
    setup.follow()
    link = next(c for c in RotationStore(setup.store).links_certifying("root-2") if c.issuer_key_id == "ca-root-1")
    _both(ceremony, "retire", "ca-root-1")
    revocation = setup.store.get_revocation(link.serial)
    assert revocation is not None and revocation.reason == RevocationReason.CESSATION_OF_OPERATION
    final = setup.store.latest_crl("ca-root-1", delta=False)
    assert final is not None
    assert x509.load_der_x509_crl(final.der).get_revoked_certificate_by_serial_number(link.serial) is not None
    retire = [e for e in setup.store.audit_events() if e["action"] == "key.retire"][-1]
    assert json.loads(retire["details"])["revoked_link_certificates"] == "1"

    # A later compromise of root-2 changes nothing on ca-root-1's final CRL, and needs not to.
    setup.new_root(ceremony, "root-3")
    _both(ceremony, "emergency", "root-2", "root-3")
    assert setup.store.get_revocation(link.serial) == revocation
    assert setup.store.latest_crl("ca-root-1", delta=False) == final


def test_a_key_the_token_no_longer_holds_is_not_activated(setup: Setup) -> None:
    """Activated after its private key was deleted from the token, a key stopped all issuance, and the recovery (a new
    root, whose links the broken key had to sign) failed half-way (a hostile review of the key ceremony)."""
    ceremony = setup.ceremony()
    setup.new_root(ceremony, "root-2")
    key = setup.store.get_ca_key("root-2")
    assert key is not None
    setup.hsm.destroy_key(Pkcs11Uri.parse(key.pkcs11_uri))  # behind the daemon's back
    with pytest.raises(FailedPrecondition, match="the token no longer holds CA key root-2") as refused:
        ceremony.approve("alice", "activate", "root-2")  # refused at the first approval, as an expired certificate is
    assert refused.value.rule == "key-in-token"
    assert setup.store.active_key_id() == "ca-root-1"
    setup.follow()
    assert setup.sign()  # issuance goes on with the active key


def test_retiring_a_pending_root_revokes_its_links_both_ways(setup: Setup) -> None:
    """A pending self-signed root was retired with no final CRL and both its links left valid (a hostile review): the
    active root still certified a key that signs nothing more, and it still certified the active root."""
    ceremony = setup.ceremony()
    setup.new_root(ceremony, "root-2")  # pending, with links ca-root-1 -> root-2 and root-2 -> ca-root-1
    rotation = RotationStore(setup.store)
    to_it = next(c for c in rotation.links_certifying("root-2") if c.issuer_key_id == "ca-root-1")
    from_it = next(c for c in rotation.links_certifying("ca-root-1") if c.issuer_key_id == "root-2")
    _both(ceremony, "retire", "root-2")
    for link in (to_it, from_it):
        revocation = setup.store.get_revocation(link.serial)
        assert revocation is not None and revocation.reason == RevocationReason.CESSATION_OF_OPERATION, link.request_id
    final = setup.store.latest_crl("root-2", delta=False)
    assert final is not None and x509.load_der_x509_crl(final.der).get_revoked_certificate_by_serial_number(from_it.serial)
    details = json.loads([e for e in setup.store.audit_events() if e["action"] == "key.retire"][-1]["details"])
    assert (details["revoked_link_certificates"], details["revoked_links_certifying_it"]) == ("1", "1")
    # The active root's own CRLs carry the link it issued for root-2.
    publisher = CrlPublisher(setup.config, setup.hsm, setup.store)
    crl = publisher.publish(publisher.issuers(datetime.now(UTC))[0], delta=False)
    assert x509.load_der_x509_crl(crl.der).get_revoked_certificate_by_serial_number(to_it.serial) is not None


def test_a_certificate_on_hold_blocks_retirement_and_a_retired_keys_certificates_cannot_change(setup: Setup) -> None:
    """certificateHold is reversible, but no CRL of a retired key could say the hold was lifted."""
    ceremony = setup.ceremony()
    held, revoked = setup.sign(), setup.sign()
    revocations = Revocations(setup.store, "ca-root-1", reissue_profiles=frozenset, caller_profiles=lambda caller: ("device",))
    asyncio.run(revocations.revoke(serial_hex(held), RevocationReason.CERTIFICATE_HOLD, None, "test", roles={"programmer"}))
    asyncio.run(revocations.revoke(serial_hex(revoked), RevocationReason.SUPERSEDED, None, "test", roles={"programmer"}))
    setup.new_root(ceremony, "root-2")
    _both(ceremony, "activate", "root-2")
    setup.follow()
    with pytest.raises(FailedPrecondition, match="on hold") as refused:
        ceremony.approve("alice", "retire", "ca-root-1")
    assert refused.value.rule == "certificates-on-hold"
    # The hold becomes final.
    asyncio.run(revocations.revoke(serial_hex(held), RevocationReason.KEY_COMPROMISE, None, "test", roles={"programmer"}))
    _both(ceremony, "retire", "ca-root-1")
    final = setup.store.latest_crl("ca-root-1", delta=False)
    assert setup.store.get_ca_key("ca-root-1").status == KeyStatus.RETIRED  # type: ignore[union-attr]
    # Every change to the retired key's revocations is refused, and nothing is written.
    with pytest.raises(FailedPrecondition, match="retired") as refused:
        asyncio.run(revocations.revoke(serial_hex(revoked), RevocationReason.KEY_COMPROMISE, None, "test", roles={"programmer"}))
    assert refused.value.rule == "issuer-retired"
    assert setup.store.get_revocation(revoked).reason == RevocationReason.SUPERSEDED  # type: ignore[union-attr]
    assert setup.store.latest_crl("ca-root-1", delta=False) == final


# --- the certificate of a key that becomes the signing key (found by a review) ---------------------------------------


def _outside_parent(starts_in: timedelta = timedelta(0)) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    parent_key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC) + starts_in
    parent = issuer.build_root(issuer.parse_subject("CN=Outside Root"), parent_key.public_key(), now, timedelta(days=3650))
    return parent_key, parent.sign(parent_key, hashes.SHA256())


def _intermediate(
    ceremony: KeyCeremony, label: str, *, not_before: datetime, not_after: datetime, key_usage: x509.KeyUsage | None = None
) -> tuple[x509.Certificate, x509.Certificate]:
    """A pending key with a parent-signed certificate of the given validity/key usage (the parent's answer to its CSR)."""
    ceremony.generate("alice", KeySpec.EC_P256, label)
    csr = x509.load_pem_x509_csr(ceremony.csr("alice", label, issuer.parse_subject(f"CN={label}")))
    return _parent_answer(csr, not_before=not_before, not_after=not_after, key_usage=key_usage)


def _parent_answer(
    csr: x509.CertificateSigningRequest,
    *,
    not_before: datetime,
    not_after: datetime,
    key_usage: x509.KeyUsage | None,
    parent_starts_in: timedelta = timedelta(0),
) -> tuple[x509.Certificate, x509.Certificate]:
    """A new outside parent's CA certificate for the CSR's key, and the parent's own certificate (valid from now +
    parent_starts_in)."""
    parent_key, parent_cert = _outside_parent(parent_starts_in)
    builder = (
        x509.CertificateBuilder()
        .subject_name(csr.subject)
        .issuer_name(parent_cert.subject)
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
    )
    if key_usage is not None:
        builder = builder.add_extension(key_usage, critical=True)
    return builder.sign(parent_key, hashes.SHA256()), parent_cert


def _key_usage(*, key_cert_sign: bool, crl_sign: bool) -> x509.KeyUsage:
    return issuer.ca_key_usage(digital_signature=True, key_cert_sign=key_cert_sign, crl_sign=crl_sign)


def test_an_expired_ca_certificate_is_refused_at_install_and_its_key_cannot_be_activated(setup: Setup) -> None:
    """Every leaf the key signed would chain to an expired CA certificate: all issuance would fail validation."""
    ceremony = setup.ceremony()
    now = datetime.now(UTC)
    cert, parent = _intermediate(ceremony, "sub-expired", not_before=now - timedelta(days=20), not_after=now - timedelta(days=1))
    with pytest.raises(InvalidRequest, match="expired at") as refused:
        ceremony.install("alice", "sub-expired", cert, [parent])
    assert refused.value.rule == "ca-certificate-validity"
    assert setup.store.get_ca_key("sub-expired").certificate_der is None  # type: ignore[union-attr]


def test_a_key_whose_ca_certificate_expired_since_install_is_neither_activated_nor_switched_to(setup: Setup) -> None:
    ceremony = setup.ceremony()
    now = datetime.now(UTC).replace(microsecond=0)
    cert, parent = _intermediate(ceremony, "sub-short", not_before=now - timedelta(days=1), not_after=now + timedelta(seconds=2))
    ceremony.install("alice", "sub-short", cert, [parent])
    time.sleep(max(0.0, (cert.not_valid_after_utc - datetime.now(UTC)).total_seconds()) + 1.2)

    with pytest.raises(FailedPrecondition, match=r"valid from .* to .*, not now") as refused:
        ceremony.approve("alice", "activate", "sub-short")
    assert refused.value.rule == "ca-certificate-validity"
    # The emergency switch must not move issuance onto a successor that can sign nothing valid either.
    with pytest.raises(FailedPrecondition, match="cannot become the signing key") as refused:
        ceremony.approve("alice", "emergency", "ca-root-1", "sub-short")
    assert refused.value.rule == "ca-certificate-validity"
    assert RotationStore(setup.store).live_officers("activate", "sub-short", "", datetime.now(UTC), timedelta(hours=1)) == []
    assert setup.store.active_key_id() == "ca-root-1"


def test_a_ca_certificate_not_yet_valid_can_be_prepublished_but_not_activated(setup: Setup) -> None:
    ceremony = setup.ceremony()
    now = datetime.now(UTC)
    cert, parent = _intermediate(ceremony, "sub-future", not_before=now + timedelta(days=30), not_after=now + timedelta(days=400))
    ceremony.install("alice", "sub-future", cert, [parent])  # published ahead of its validity: relying parties can add it
    with pytest.raises(FailedPrecondition, match=re.escape(f"valid from {cert.not_valid_before_utc.isoformat()}")) as refused:
        ceremony.approve("alice", "activate", "sub-future")
    assert refused.value.rule == "ca-certificate-validity"
    assert setup.store.active_key_id() == "ca-root-1"


@pytest.mark.parametrize(("key_cert_sign", "crl_sign", "missing"), [(False, True, "keyCertSign"), (True, False, "cRLSign")])
def test_install_refuses_a_ca_certificate_whose_key_usage_lacks_keycertsign_or_crlsign(
    setup: Setup, key_cert_sign: bool, crl_sign: bool, missing: str
) -> None:
    """CA:true with a KeyUsage without keyCertSign cannot verify certificate signatures (RFC 5280 4.2.1.3); the key signs its CRLs too."""
    ceremony = setup.ceremony()
    now = datetime.now(UTC)
    usage = _key_usage(key_cert_sign=key_cert_sign, crl_sign=crl_sign)
    cert, parent = _intermediate(
        ceremony, "sub-usage", not_before=now - timedelta(minutes=1), not_after=now + timedelta(days=30), key_usage=usage
    )
    with pytest.raises(InvalidRequest, match=f"KeyUsage lacks {missing}") as refused:
        ceremony.install("alice", "sub-usage", cert, [parent])
    assert refused.value.rule == "ca-key-usage"
    assert setup.store.get_ca_key("sub-usage").certificate_der is None  # type: ignore[union-attr]
    # With both, it installs.
    good, parent = _intermediate(
        ceremony,
        "sub-usage-ok",
        not_before=now - timedelta(minutes=1),
        not_after=now + timedelta(days=30),
        key_usage=_key_usage(key_cert_sign=True, crl_sign=True),
    )
    assert ceremony.install("alice", "sub-usage-ok", good, [parent]).certificate_der is not None


def test_install_requires_an_intermediates_parent_chain_of_ca_certificates(setup: Setup) -> None:
    """README: issued certificates come back with the whole chain (intermediate, then parents)."""
    ceremony = setup.ceremony()
    now = datetime.now(UTC)
    cert, parent = _intermediate(ceremony, "sub-chain", not_before=now - timedelta(minutes=1), not_after=now + timedelta(days=30))
    assert cert.issuer != cert.subject
    with pytest.raises(InvalidRequest, match="no parent certificate was given") as refused:
        ceremony.install("alice", "sub-chain", cert, [])
    assert refused.value.rule == "ca-chain"
    assert setup.store.get_ca_key("sub-chain").certificate_der is None  # type: ignore[union-attr]

    # A parent that is no CA certificate (a leaf with the parent's name) is refused before its signature is checked.
    parent_key = ec.generate_private_key(ec.SECP256R1())
    not_ca = (
        x509.CertificateBuilder()
        .subject_name(parent.subject)
        .issuer_name(parent.subject)
        .public_key(parent.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(parent_key, hashes.SHA256())
    )
    with pytest.raises(InvalidRequest, match="is not a CA certificate") as refused:
        ceremony.install("alice", "sub-chain", cert, [not_ca])
    assert refused.value.rule == "ca-chain"
    assert ceremony.install("alice", "sub-chain", cert, [parent]).chain_der == (parent.public_bytes(serialization.Encoding.DER),)


# --- dual control (found by a review) ---------------------------------------------------------------------------------


def test_an_approval_is_void_once_the_keys_status_changes(setup: Setup) -> None:
    """Alice approves retiring an unused pending key; after it became the active root and was superseded,
    her approval must not count toward retiring it with bob's: it was given for a different state."""
    ceremony = setup.ceremony(window_s=3600)
    setup.new_root(ceremony, "root-2")  # pending, links ca-root-1 <-> root-2
    assert not ceremony.approve("alice", "retire", "root-2").executed
    _both(ceremony, "activate", "root-2")
    setup.follow()
    setup.new_root(ceremony, "root-3")
    _both(ceremony, "activate", "root-3")
    setup.follow()
    assert setup.store.get_ca_key("root-2").status == KeyStatus.SUPERSEDED  # type: ignore[union-attr]

    result = ceremony.approve("bob", "retire", "root-2")
    assert not result.executed and result.officers == ("bob",), result
    assert setup.store.get_ca_key("root-2").status == KeyStatus.SUPERSEDED  # type: ignore[union-attr]
    assert ceremony.approve("alice", "retire", "root-2").executed  # approved again, for the key as it is now


def test_an_approval_given_before_the_key_had_a_certificate_is_void_once_one_is_installed(setup: Setup) -> None:
    """Alice approves retiring a generated key that has no certificate yet (abandoning it); a certificate is then
    installed, which makes it a root that devices may come to chain to. Her approval was given for the key as it was:
    bob's approval alone does not retire the certified key."""
    ceremony = setup.ceremony(window_s=3600)
    ceremony.generate("carol", KeySpec.EC_P256, "root-2")
    assert not ceremony.approve("alice", "retire", "root-2").executed
    ceremony.self_sign("carol", "root-2", issuer.parse_subject("CN=root-2"), timedelta(days=30))
    result = ceremony.approve("bob", "retire", "root-2")
    assert not result.executed and result.officers == ("bob",), result
    assert setup.store.get_ca_key("root-2").status == KeyStatus.PENDING  # type: ignore[union-attr]
    assert ceremony.approve("alice", "retire", "root-2").executed  # approved again, for the key as it is now


def test_an_approval_stamped_ahead_of_the_clock_is_not_live(setup: Setup) -> None:
    """The window is [now - window, now]: an approval stamped in the future (the clock stepped back since, e.g. by
    NTP) must not stay live for its offset plus the window; and executing consumes it, so it never comes alive."""
    ceremony = setup.ceremony(window_s=2)
    setup.new_root(ceremony, "root-2")
    ahead = datetime.now(UTC).replace(microsecond=0) + timedelta(days=1)  # alice's host clock was a day fast
    event = AuditEvent(time=ahead, actor="alice", action="key.approve", outcome="approved", key_id="root-2", details={})
    RotationStore(setup.store).approve("activate", "root-2", "", "alice", ahead, timedelta(seconds=2), event)
    time.sleep(3.2)  # well beyond the 2 s window in real time
    result = ceremony.approve("bob", "activate", "root-2")
    assert not result.executed and result.officers == ("bob",), result
    assert setup.store.active_key_id() == "ca-root-1"


def test_one_root_is_activated_over_another_only_with_links_between_those_two(setup: Setup) -> None:
    """README: "Activation of one root over another is refused while the links are missing."

    root-2 and root-3, both self-signed while ca-root-1 was active, each have links with ca-root-1 but none with
    each other: a device that trusts only root-3 could not validate root-2's leaves.
    """
    ceremony = setup.ceremony()
    setup.new_root(ceremony, "root-2")  # links ca-root-1 <-> root-2
    setup.new_root(ceremony, "root-3")  # links ca-root-1 <-> root-3
    _both(ceremony, "activate", "root-3")
    setup.follow()
    between = [
        c.request_id for c in RotationStore(setup.store).links() if {c.issuer_key_id, c.device_id.split(":", 1)[1]} == {"root-2", "root-3"}
    ]
    assert between == []
    with pytest.raises(FailedPrecondition, match="link certificates between root-3 and root-2") as refused:
        ceremony.approve("alice", "activate", "root-2")
    assert refused.value.rule == "link-certificates"
    assert setup.store.active_key_id() == "root-3"


def _first_key_certified_by_outside_parent(
    tmp_path: Path, softhsm_conf: Path, *, starts_in: timedelta, ends_in: timedelta, parent_starts_in: timedelta = timedelta(0)
) -> Path:
    """A new set-up whose first key (`[ca] key`) has an outside parent's certificate, valid from/to these offsets from its
    signing (after the slow set-up steps), installed before any start; the parent's own is valid from parent_starts_in."""
    env = make_env(tmp_path, softhsm_conf, init=False)
    csr_path, cert_path, parent_path = tmp_path / "ca.csr", tmp_path / "ca.pem", tmp_path / "parent.pem"
    env.cli("init", "--csr-out", str(csr_path), "--subject", "CN=Factory Issuing CA")
    csr = x509.load_pem_x509_csr(csr_path.read_bytes())
    key_usage = _key_usage(key_cert_sign=True, crl_sign=True)
    now = datetime.now(UTC).replace(microsecond=0)
    certificate, parent = _parent_answer(
        csr, not_before=now + starts_in, not_after=now + ends_in, key_usage=key_usage, parent_starts_in=parent_starts_in
    )
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    parent_path.write_bytes(parent.public_bytes(serialization.Encoding.PEM))
    env.cli("ca", "import-cert", "--label", "ca-root-1", "--cert", str(cert_path), "--chain", str(parent_path))
    return env.config_path


def test_the_first_start_does_not_activate_a_ca_certificate_that_is_not_yet_valid(tmp_path: Path, softhsm_conf: Path) -> None:
    """The daemon activated its first key at start whatever its certificate's dates, and signed leaves that chain to nothing valid."""
    config_path = _first_key_certified_by_outside_parent(tmp_path, softhsm_conf, starts_in=timedelta(days=2), ends_in=timedelta(days=400))
    stderr = _first_start_refused(config_path, r"valid from .* to .*, not now .*start it after")
    assert "start it after" in stderr, stderr


def _first_start_refused(config_path: Path, expected: str) -> str:
    """Loading the authority refuses (expected, rule ca-certificate-validity) and activates nothing; then `serve`, as a
    user meets it, exits non-zero and serves nothing. Its stderr."""
    cfg = config.load(config_path)
    hsm, store = app.connect_hsm(cfg), app.connect_store(cfg)
    try:
        with pytest.raises(FailedPrecondition, match=expected) as refused:
            Authority.load(cfg, hsm, store)
        assert refused.value.rule == "ca-certificate-validity"
        assert store.get_ca_key("ca-root-1").status == KeyStatus.PENDING  # type: ignore[union-attr]
        assert store.active_key_id() is None
    finally:
        store.close()
        hsm.close()
    served = subprocess.run(
        [CA_DAEMON, "--config", str(config_path), "serve"],
        capture_output=True,
        text=True,
        env=daemon_environment(),
        timeout=60,
        check=False,
    )
    assert served.returncode != 0, served.stderr
    return served.stderr


def test_the_first_start_does_not_activate_a_key_whose_parent_certificate_is_not_valid_now(tmp_path: Path, softhsm_conf: Path) -> None:
    """The first start checked only the CA certificate's validity, not its parents' as the key ceremony's activation
    does: it activated the key, and every leaf it signed chained to a parent no relying party accepted yet."""
    config_path = _first_key_certified_by_outside_parent(
        tmp_path, softhsm_conf, starts_in=timedelta(days=-1), ends_in=timedelta(days=400), parent_starts_in=timedelta(days=2)
    )
    expected = r"the parent certificate 'CN=Outside Root' in the chain of key ca-root-1 is valid from .* to .*, not now .*start it after"
    stderr = _first_start_refused(config_path, expected)
    lines = [line for line in stderr.splitlines() if "CN=Outside Root" in line]
    assert len(lines) == 1 and re.search(expected, lines[0]), stderr


def test_an_active_key_whose_ca_certificate_expired_signs_nothing(tmp_path: Path, softhsm_conf: Path) -> None:
    """Sign went on issuing leaves clamped to the expired CA's notAfter: already expired when they were returned."""
    # Long enough for the import, the first start and one Sign on a loaded machine, then it expires.
    config_path = _first_key_certified_by_outside_parent(tmp_path, softhsm_conf, starts_in=timedelta(days=-1), ends_in=timedelta(seconds=6))
    cfg = config.load(config_path)
    hsm, store = app.connect_hsm(cfg), app.connect_store(cfg)
    authority = Authority.load(cfg, hsm, store)  # valid at the first start: activated

    def sign() -> int:
        request = CertificateRequest(csr=device_csr(), profile="", request_id=str(uuid.uuid4()), caller="local-developer")
        return asyncio.run(authority.sign(request)).certificate.serial

    try:
        sign()
        time.sleep(max(0.0, (authority.active.certificate.not_valid_after_utc - datetime.now(UTC)).total_seconds()) + 1.2)
        with pytest.raises(FailedPrecondition, match=r"not now .*rotate to a new CA key") as refused:
            sign()
        assert refused.value.rule == "ca-certificate-validity"
        assert store.count_certificates() == 1
        authority.close()  # flushes the audit log's pending refusal
        refusals = [e for e in store.audit_events() if e["outcome"] == "refused"]
        assert [e["reason"] for e in refusals] == ["ca-certificate-validity"]
    finally:
        authority.close()
        store.close()
        hsm.close()


def test_a_reload_during_a_key_switch_is_not_undone_by_it(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    """The switch (token's thread) rebuilt the policy from the configuration in force when it began, and put that in
    force after a reload (loop's thread) that landed meanwhile: the reload was silently undone in that worker."""
    ceremony = setup.ceremony()
    setup.new_root(ceremony, "root-2")
    _both(ceremony, "activate", "root-2")
    switch_building, switch_may_finish = threading.Event(), threading.Event()
    build = authority_module.build_policy_set

    def held_in_the_switch(*args: Any) -> Any:  # the switch builds on the token's thread: hold it there
        built = build(*args)
        if threading.current_thread() is not threading.main_thread() and not switch_may_finish.is_set():
            switch_building.set()
            switch_may_finish.wait(10)
        return built

    monkeypatch.setattr(authority_module, "build_policy_set", held_in_the_switch)
    switching = threading.Thread(target=setup.follow)
    switching.start()
    assert switch_building.wait(10)
    reloaded = dataclasses.replace(setup.config, caller_quotas={"local-developer": 7})
    reloading = threading.Thread(target=setup.authority.reload, args=(reloaded,))
    reloading.start()
    reloading.join(0.5)  # the old code finished the reload here, before the switch put its policy in force
    switch_may_finish.set()
    switching.join(10)
    reloading.join(10)
    assert setup.authority.active.key.key_id == "root-2"
    assert setup.authority.policy.caller_quotas == {"local-developer": 7}


def test_a_crl_whose_number_another_process_took_is_built_again_and_nothing_follows_a_final_crl(setup: Setup) -> None:
    """The CRL leader and the key ceremony publish the same key's CRLs from different processes (seen in a fresh-clone
    CI run: a retirement failed with 'CRL number 4 ... is not above the last published 4', and a failure of that kind
    turned CRL health NOT_SERVING everywhere)."""
    publisher = CrlPublisher(setup.config, setup.hsm, setup.store)
    key = setup.store.get_ca_key("ca-root-1")
    assert key is not None
    issuer = publisher.issuer_of(key)
    publisher.publish(issuer, delta=False)

    class Overtaken(CrlPublisher):
        """Between building its CRL and storing it, another process publishes that number (here: the ceremony's CLI)."""

        overtaken = False

        def check(self, issuer: Any, crl: Any) -> None:
            super().check(issuer, crl)
            if not self.overtaken:
                self.overtaken = True
                CrlPublisher(setup.config, setup.hsm, setup.store).publish(issuer, delta=True)

    before = setup.store.max_crl_number("ca-root-1")
    leader = Overtaken(setup.config, setup.hsm, setup.store)
    published = leader.publish(issuer, delta=True)
    assert leader.overtaken and published.crl_number == before + 2 == setup.store.max_crl_number("ca-root-1")
    assert setup.store.crl_failures() == []

    # The final CRL stays the last one: the leader's next scheduled CRL is refused, and that is no failure either.
    final = publisher.publish_final(issuer)
    with pytest.raises(FailedPrecondition) as refused:
        leader.publish(issuer, delta=True)
    assert refused.value.rule == "issuer-final-crl"
    assert setup.store.max_crl_number("ca-root-1") == final.crl_number and setup.store.crl_failures() == []


def test_two_generations_of_one_label_at_once_leave_one_key(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both passed the label check before either recorded its key: both were told OK, the token kept two pairs."""
    ceremony = setup.ceremony()
    both_checked = threading.Barrier(2, timeout=30)
    check = authority_module.check_new_key_label

    def check_then_wait(hsm: Hsm, store: SqlStore, label: str) -> None:
        check(hsm, store, label)
        both_checked.wait()  # the real check passed in both threads; now both generate

    monkeypatch.setattr(authority_module, "check_new_key_label", check_then_wait)
    outcomes = at_once(lambda: ceremony.generate("alice", KeySpec.EC_P256, "twice"))
    refusals = [o for o in outcomes if isinstance(o, FailedPrecondition)]
    assert len(outcomes) == 2 and len(refusals) == 1, outcomes
    assert refusals[0].rule == "label" and "exists already" in refusals[0].message
    key = setup.store.get_ca_key("twice")
    assert key is not None and outcomes[outcomes.index(refusals[0]) ^ 1] == key
    # One pair under the label, and it is the recorded one (a lookup by label alone is not ambiguous).
    by_label = Pkcs11Uri(token=setup.hsm.token_label, label="twice")
    assert setup.hsm.public_key_der(by_label) == key.public_key_der
    setup.hsm.private_key_attributes(by_label)
    outcomes_audited = [e["outcome"] for e in setup.store.audit_events() if e["action"] == "key.generate" and e["key_id"] == "twice"]
    assert sorted(outcomes_audited) == ["generated", "refused"]


def test_install_refuses_a_parent_chain_no_relying_party_accepts_and_activation_a_parent_not_valid_now(
    setup: Setup, tmp_path: Path
) -> None:
    """An expired parent, one whose pathLenConstraint is 0, one without keyCertSign: before, each was installed, the key
    activated, and every leaf it signed failed `openssl verify`. A parent not yet valid may be pre-published, not activated."""
    ceremony = setup.ceremony()
    now = datetime.now(UTC)
    usage_crl_only = issuer.ca_key_usage(digital_signature=True, key_cert_sign=False, crl_sign=True)
    cases = [
        ("expired", now - timedelta(days=10), now - timedelta(days=1), None, None, "expired at"),
        ("pathlen", now - timedelta(days=1), now + timedelta(days=30), 0, None, "pathLenConstraint"),
        ("usage", now - timedelta(days=1), now + timedelta(days=30), None, usage_crl_only, "without keyCertSign"),
    ]
    for label, not_before, not_after, path_length, usage, message in cases:
        cert, parent = _chain_with_parent(ceremony, label, not_before, not_after, path_length, usage)
        with pytest.raises(InvalidRequest, match=message) as refused:
            ceremony.install("alice", label, cert, [parent])
        assert refused.value.rule == "ca-chain" and refused.value.field == "chain_pem"
        assert setup.store.get_ca_key(label).certificate_der is None  # type: ignore[union-attr]
        assert RotationStore(setup.store).lifecycle(label).get("published_at") is None

    cert, parent = _chain_with_parent(ceremony, "later", now + timedelta(days=1), now + timedelta(days=30), None, None)
    ceremony.install("alice", "later", cert, [parent])  # pre-published
    with pytest.raises(FailedPrecondition, match=r"parent certificate 'CN=Outside later' .* not now") as early:
        ceremony.approve("alice", "activate", "later")
    assert early.value.rule == "ca-certificate-validity"

    # A good parent: the leaves of the activated key validate with openssl.
    cert, parent = _chain_with_parent(ceremony, "good", now - timedelta(days=1), now + timedelta(days=30), 1, None)
    ceremony.install("alice", "good", cert, [parent])
    _both(ceremony, "activate", "good")
    setup.follow()
    leaf = x509.load_der_x509_certificate(setup.store.get_certificate(setup.sign()).der)  # type: ignore[union-attr]
    files = {}
    for name, c in (("root", parent), ("sub", cert), ("leaf", leaf)):
        files[name] = tmp_path / f"{name}.pem"
        files[name].write_bytes(c.public_bytes(serialization.Encoding.PEM))
    verify = ["openssl", "verify", "-x509_strict", "-CAfile", str(files["root"]), "-untrusted", str(files["sub"]), str(files["leaf"])]
    result = subprocess.run(verify, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def _chain_with_parent(
    ceremony: KeyCeremony,
    label: str,
    not_before: datetime,
    not_after: datetime,
    path_length: int | None,
    usage: x509.KeyUsage | None,
) -> tuple[x509.Certificate, x509.Certificate]:
    """A pending key's CA certificate (valid now) signed by a new outside root with these validity and constraints."""
    ceremony.generate("alice", KeySpec.EC_P256, label)
    csr = x509.load_pem_x509_csr(ceremony.csr("alice", label, issuer.parse_subject(f"CN={label}")))
    parent_key = ec.generate_private_key(ec.SECP256R1())
    name = issuer.parse_subject(f"CN=Outside {label}")
    parent = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(parent_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(usage or issuer.ca_key_usage(digital_signature=True, key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(parent_key.public_key()), critical=False)
        .sign(parent_key, hashes.SHA256())
    )
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(csr.subject)
        .issuer_name(name)
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=2))
        .not_valid_after(now + timedelta(days=20))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(issuer.ca_key_usage(digital_signature=True, key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(csr.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(parent_key.public_key()), critical=False)
        .sign(parent_key, hashes.SHA256())
    )
    return cert, parent


def test_two_completing_approvals_at_once_both_answer_what_happened(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    """carol approved; bob and alice approve at the same moment (two workers): both see three officers, one executes.

    The other was refused with "needs approvals from 2 distinct officers within the window; live: 0" (or "CA key ... is
    active") although its approval was recorded and the key it approved had just been activated.
    """
    setup.new_root(setup.ceremony(), "root-2")
    setup.ceremony().approve("carol", "activate", "root-2")
    both_recorded = threading.Barrier(2, timeout=30)
    record = RotationStore.approve

    def record_then_wait(self: RotationStore, *args: Any) -> list[str]:
        officers = record(self, *args)
        both_recorded.wait()  # each saw carol's approval and its own, and the other's too or not: both go on to execute
        return officers

    monkeypatch.setattr(RotationStore, "approve", record_then_wait)
    answers: dict[str, object] = {}

    def approve(officer: str) -> None:
        try:
            answers[officer] = setup.ceremony().approve(officer, "activate", "root-2")
        except FailedPrecondition as refusal:
            answers[officer] = refusal

    threads = [threading.Thread(target=approve, args=(officer,)) for officer in ("alice", "bob")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert all(isinstance(a, ApprovalResult) for a in answers.values()), answers
    results = [a for a in answers.values() if isinstance(a, ApprovalResult)]
    assert sorted(r.executed for r in results) == [False, True]
    other = next(r for r in results if not r.executed)
    assert "a concurrent approval executed it" in other.message and "CA key root-2 is active" in other.message
    assert setup.store.active_key_id() == "root-2"
    assert [e["outcome"] for e in setup.store.audit_events() if e["action"] == "key.activate" and e["key_id"] == "root-2"] == ["executed"]
    assert [e for e in setup.store.audit_events() if e["outcome"] == "refused"] == []


def test_a_certificate_is_installed_only_on_the_key_as_it_is_now(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    """Install and self-sign read the key, checked it, and saved the whole record read then.

    A pending key retired by two officers while an install ran came back pending, with the certificate, published (a
    retired key revived, activatable); two self-signs at once both wrote a certificate, the second replacing the one
    the first officer had been given and failing on the links after that.
    """
    ceremony = setup.ceremony()
    cert, parent = _chain_with_parent(
        ceremony, "sub-r", datetime.now(UTC) - timedelta(days=1), datetime.now(UTC) + timedelta(days=30), 1, None
    )
    ceremony.generate("alice", KeySpec.EC_P256, "root-s")
    checked, proceed = threading.Event(), threading.Event()
    pending_check = KeyCeremony._pending_without_certificate

    def check_then_wait(self: KeyCeremony, key_id: str) -> Any:
        key = pending_check(self, key_id)
        checked.set()
        assert proceed.wait(timeout=30)
        return key

    monkeypatch.setattr(KeyCeremony, "_pending_without_certificate", check_then_wait)
    outcome: list[object] = []

    def install() -> None:
        try:
            outcome.append(ceremony.install("alice", "sub-r", cert, [parent]))
        except FailedPrecondition as refusal:
            outcome.append(refusal)

    thread = threading.Thread(target=install)
    thread.start()
    assert checked.wait(timeout=30)
    _both(ceremony, "retire", "sub-r")  # meanwhile
    proceed.set()
    thread.join(timeout=60)
    assert isinstance(outcome[0], FailedPrecondition) and outcome[0].rule == "key-status", outcome
    key = setup.store.get_ca_key("sub-r")
    assert key is not None and key.status == KeyStatus.RETIRED and key.certificate_der is None
    assert RotationStore(setup.store).lifecycle("sub-r").get("published_at") is None

    # Two self-signs of one key at once: one installs (with its links), the other changes nothing.
    checked.clear()
    proceed.clear()
    answers: list[object] = []

    def self_sign(officer: str) -> None:
        try:
            answers.append(ceremony.self_sign(officer, "root-s", issuer.parse_subject("CN=root-s"), timedelta(days=30)))
        except FailedPrecondition as refusal:
            answers.append(refusal)

    threads = [threading.Thread(target=self_sign, args=(officer,)) for officer in ("alice", "bob")]
    for t in threads:
        t.start()
    time.sleep(0.5)  # both passed the check and wait
    proceed.set()
    for t in threads:
        t.join(timeout=60)
    signed = [a for a in answers if not isinstance(a, FailedPrecondition)]
    assert len(answers) == 2 and len(signed) == 1, answers
    key = setup.store.get_ca_key("root-s")
    assert key is not None and key.certificate_der == signed[0].key.certificate_der  # type: ignore[attr-defined]
    installed = [e for e in setup.store.audit_events() if e["action"] == "key.certificate" and e["key_id"] == "root-s"]
    assert [e["outcome"] for e in installed] == ["installed", "refused"]


def test_a_root_is_activated_over_an_active_root_whose_certificate_expired(setup: Setup) -> None:
    """Sign refuses under an expired root and says to rotate; rotating was refused for good.

    self_sign made the two links with the expired root, born expired (they end with the earlier root), and activation
    then said they were "missing" and to self-sign a new key, which got the same expired links again.
    """
    rotation = RotationConfig(approval_window=timedelta(seconds=60), prepublication=timedelta(0), poll_interval=timedelta(milliseconds=100))
    ceremony = KeyCeremony(dataclasses.replace(setup.config, rotation=rotation), setup.hsm, setup.store)
    ceremony.generate("alice", KeySpec.EC_P256, "short")
    short = setup.store.get_ca_key("short")
    assert short is not None
    authority_module.self_sign_root(setup.hsm, setup.store, short, issuer.parse_subject("CN=short"), timedelta(seconds=2))
    RotationStore(setup.store).mark_published("short", datetime.now(UTC) - timedelta(days=1))
    _both(ceremony, "emergency", "ca-root-1", "short")  # the quickest way to an active root that expires
    expires = x509.load_der_x509_certificate(setup.store.get_ca_key("short").certificate_der).not_valid_after_utc  # type: ignore[union-attr, arg-type]
    time.sleep(max(0.0, (expires - datetime.now(UTC)).total_seconds()) + 1.1)
    ceremony.generate("alice", KeySpec.EC_P256, "next")
    made = ceremony.self_sign("alice", "next", issuer.parse_subject("CN=next"), timedelta(days=30))
    assert made.links == ()  # none born expired
    assert "CA key next is active; short is superseded" in _both(ceremony, "activate", "next")
    setup.follow()
    leaf = x509.load_der_x509_certificate(setup.store.get_certificate(setup.sign()).der)  # type: ignore[union-attr]
    leaf.verify_directly_issued_by(x509.load_der_x509_certificate(made.key.certificate_der))  # type: ignore[arg-type]


def test_install_refuses_a_certificate_or_parent_with_a_critical_extension_no_relying_party_knows(setup: Setup, tmp_path: Path) -> None:
    """RFC 5280 4.2: a relying party rejects a certificate with a critical extension it does not recognize. Before,
    such an intermediate (or parent) was installed, and every leaf of the key failed (openssl: unhandled critical
    extension)."""
    ceremony = setup.ceremony()
    unknown = x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.55555.1"), b"\x05\x00")
    for label, where in (("crit-sub", "certificate"), ("crit-parent", "parent")):
        cert, parent = _outside_chain(
            ceremony,
            label,
            certificate_extension=unknown if where == "certificate" else None,
            parent_extension=unknown if where == "parent" else None,
            critical=True,
        )
        # What a relying party makes of that chain: the intermediate itself does not verify.
        files = {name: tmp_path / f"{label}-{name}.pem" for name in ("root", "sub")}
        files["root"].write_bytes(parent.public_bytes(serialization.Encoding.PEM))
        files["sub"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        verify = ["openssl", "verify", "-CAfile", str(files["root"]), str(files["sub"])]
        checked = subprocess.run(verify, capture_output=True, text=True, check=False)
        assert checked.returncode != 0 and "unhandled critical extension" in checked.stdout + checked.stderr, checked.stdout
        with pytest.raises(InvalidRequest, match=r"critical extension 1\.3\.6\.1\.4\.1\.55555\.1") as refused:
            ceremony.install("alice", label, cert, [parent])
        assert refused.value.rule == "ca-chain"
        assert refused.value.field == ("certificate_pem" if where == "certificate" else "chain_pem")
        assert setup.store.get_ca_key(label).certificate_der is None  # type: ignore[union-attr]


def _chain_with_extended_key_usage(
    ceremony: KeyCeremony, label: str, *, certificate_eku: x509.ExtendedKeyUsage | None, parent_eku: x509.ExtendedKeyUsage | None
) -> tuple[x509.Certificate, x509.Certificate]:
    """A pending key's CA certificate signed by a new outside root, each with this extendedKeyUsage (None: none)."""
    return _outside_chain(ceremony, label, certificate_extension=certificate_eku, parent_extension=parent_eku)


def _outside_chain(
    ceremony: KeyCeremony,
    label: str,
    *,
    certificate_extension: x509.ExtensionType | None = None,
    parent_extension: x509.ExtensionType | None = None,
    critical: bool = False,
) -> tuple[x509.Certificate, x509.Certificate]:
    """A pending key's CA certificate signed by a new outside root, each with this extra extension (None: none)."""
    ceremony.generate("alice", KeySpec.EC_P256, label)
    csr = x509.load_pem_x509_csr(ceremony.csr("alice", label, issuer.parse_subject(f"CN={label}")))
    parent_key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    parent_builder = issuer.build_root(issuer.parse_subject(f"CN=Outside {label}"), parent_key.public_key(), now, timedelta(days=30))
    if parent_extension is not None:
        parent_builder = parent_builder.add_extension(parent_extension, critical=critical)
    parent = parent_builder.sign(parent_key, hashes.SHA256())
    builder = (
        x509.CertificateBuilder()
        .subject_name(csr.subject)
        .issuer_name(parent.subject)
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=20))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(issuer.ca_key_usage(digital_signature=True, key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(csr.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(parent_key.public_key()), critical=False)
    )
    if certificate_extension is not None:
        builder = builder.add_extension(certificate_extension, critical=critical)
    return builder.sign(parent_key, hashes.SHA256()), parent


def _device_certificate_signed_by(setup: Setup, label: str, ca_certificate: x509.Certificate) -> str:
    """A device certificate (EKU clientAuth, as the default profile issues) signed by the key in the token, in PEM."""
    device_key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(issuer.parse_subject("CN=dev-eku-1"))
        .issuer_name(ca_certificate.subject)
        .public_key(device_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(issuer.ca_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(device_key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                ca_certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            ),
            critical=False,
        )
    )
    private = setup.hsm.private_key(Pkcs11Uri(token=setup.hsm.token_label, label=label))
    return leaf.sign(private, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()  # type: ignore[arg-type]


def test_install_refuses_a_certificate_or_parent_whose_extended_key_usage_excludes_client_auth(setup: Setup, tmp_path: Path) -> None:
    """An intermediate (or parent) with extendedKeyUsage serverAuth only was installed, and every device certificate
    (EKU clientAuth) its key signed then failed a relying party that checks the purpose through the chain (openssl
    -purpose sslclient, as a TLS server checks its clients; Go's and Java's TLS stacks)."""
    ceremony = setup.ceremony()
    server_only = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])
    # anyExtendedKeyUsage alone too: OpenSSL (the TLS stack of Mosquitto and most brokers) does not take it for clientAuth.
    any_only = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE])
    for label, where, eku, named in (
        ("eku-sub", "certificate", server_only, "serverAuth"),
        ("eku-parent", "parent", server_only, "serverAuth"),
        ("eku-any-only", "certificate", any_only, "anyExtendedKeyUsage"),
    ):
        cert, parent = _chain_with_extended_key_usage(
            ceremony,
            label,
            certificate_eku=eku if where == "certificate" else None,
            parent_eku=eku if where == "parent" else None,
        )
        # What a relying party makes of a device certificate under that chain: valid, but not for a TLS client.
        leaf_pem = _device_certificate_signed_by(setup, label, cert)
        chain = authority_module.chain_pem(
            cert.public_bytes(serialization.Encoding.DER), (parent.public_bytes(serialization.Encoding.DER),)
        )
        assert openssl_verify(tmp_path, leaf_pem, chain).returncode == 0
        as_client = openssl_verify(tmp_path, leaf_pem, chain, "-purpose", "sslclient")
        assert as_client.returncode != 0 and "unsuitable certificate purpose" in as_client.stdout + as_client.stderr, as_client.stdout
        excludes = rf"has extendedKeyUsage \({named}\), which excludes clientAuth \(issued by profile device\)"
        with pytest.raises(InvalidRequest, match=excludes) as refused:
            ceremony.install("alice", label, cert, [parent])
        assert refused.value.rule == "ca-chain"
        assert refused.value.field == ("certificate_pem" if where == "certificate" else "chain_pem")
        assert setup.store.get_ca_key(label).certificate_der is None  # type: ignore[union-attr]
        assert RotationStore(setup.store).lifecycle(label).get("published_at") is None
    # clientAuth among others (anyExtendedKeyUsage beside it too), or no EKU at all: installed.
    both = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    any_and_client = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE, ExtendedKeyUsageOID.CLIENT_AUTH])
    installed: tuple[tuple[str, x509.ExtendedKeyUsage | None], ...] = (("eku-both", both), ("eku-any", any_and_client), ("eku-none", None))
    for label, usage in installed:
        cert, parent = _chain_with_extended_key_usage(ceremony, label, certificate_eku=usage, parent_eku=usage)
        ceremony.install("alice", label, cert, [parent])
        assert setup.store.get_ca_key(label).certificate_der is not None  # type: ignore[union-attr]


def test_export_before_the_first_start_names_a_parent_certificate_not_yet_valid_and_when_the_key_can_start(
    tmp_path: Path, softhsm_conf: Path
) -> None:
    """Export said the first key "becomes the signing key when the daemon first starts", which the first start refused
    (its parent is not valid yet): it names the parent and the time from which the daemon starts with the key."""
    config_path = _first_key_certified_by_outside_parent(
        tmp_path, softhsm_conf, starts_in=timedelta(days=-1), ends_in=timedelta(days=400), parent_starts_in=timedelta(days=2)
    )
    parent = x509.load_pem_x509_certificate((tmp_path / "parent.pem").read_bytes())
    exported = tmp_path / "export.pem"
    done = subprocess.run(
        [CA_DAEMON, "--config", str(config_path), "ca", "export", "--out", str(exported)],
        capture_output=True,
        text=True,
        env=daemon_environment(),
        check=True,
    )
    starts = parent.not_valid_before_utc
    assert f"the parent certificate 'CN=Outside Root' in the chain of key ca-root-1 is valid from {starts.isoformat()}" in done.stderr
    assert f"CA key ca-root-1 becomes the signing key when the daemon first starts after {starts.isoformat()}" in done.stderr, done.stderr
    assert "when the daemon first starts (" not in done.stderr
    assert x509.load_pem_x509_certificates(exported.read_bytes()) == [
        x509.load_pem_x509_certificate((tmp_path / "ca.pem").read_bytes()),
        parent,
    ]


def test_export_before_the_first_start_refuses_a_key_whose_parent_certificate_expired(tmp_path: Path, softhsm_conf: Path) -> None:
    """The first start refuses the key (its parent expired since the import): export does not hand out that chain as the
    one the daemon will issue under, as it does not for a CA certificate that expired."""
    config_path = _first_key_certified_by_outside_parent(tmp_path, softhsm_conf, starts_in=timedelta(days=-1), ends_in=timedelta(days=400))
    # The parent's certificate replaced by one that expired a minute ago (import-cert refuses an expired one).
    parent_key, _ = _outside_parent()
    now = datetime.now(UTC)
    expired = issuer.build_root(
        issuer.parse_subject("CN=Outside Root"),
        parent_key.public_key(),
        now - timedelta(days=30),
        timedelta(days=30) - timedelta(minutes=1),
    )
    expired_der = expired.sign(parent_key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)
    with sqlite3.connect(config.load(config_path).state_dir / "ca.db") as database:
        assert database.execute("UPDATE ca_keys SET chain_der = ? WHERE key_id = 'ca-root-1'", (expired_der,)).rowcount == 1
    exported = tmp_path / "export.pem"
    refused = subprocess.run(
        [CA_DAEMON, "--config", str(config_path), "ca", "export", "--out", str(exported)],
        capture_output=True,
        text=True,
        env=daemon_environment(),
        check=False,
    )
    assert refused.returncode == 1, refused.stderr
    assert "the parent certificate 'CN=Outside Root' in the chain of key ca-root-1 is valid from" in refused.stderr, refused.stderr
    assert "have the parent CA renew it" in refused.stderr and "the daemon will not start with CA key ca-root-1: " in refused.stderr, (
        refused.stderr
    )
    assert "becomes the signing key" not in refused.stderr and not exported.exists()


def test_generate_is_refused_while_the_urls_would_not_name_the_new_key(setup: Setup) -> None:
    """Every other key's URLs are the configured ones with its label in place of [ca] key's: with a CDP that does not name
    ca-root-1 (or names it only percent-encoded), root-2's certificates pointed where ca-root-1's CRL is served, and both
    keys' CRLs were served at that one path, each replacing the other. Refused, audited, and nothing made."""
    for url in ("http://127.0.0.1:8080/factory.crl", "http://127.0.0.1:8080/crl/ca%2Droot-1.crl"):
        ca = dataclasses.replace(setup.config.ca, crl_distribution_points=(url,))
        ceremony = KeyCeremony(dataclasses.replace(setup.config, ca=ca), setup.hsm, setup.store)
        with pytest.raises(FailedPrecondition) as refused:
            ceremony.generate("alice", KeySpec.EC_P256, "root-2")
        assert refused.value.rule == "key-urls"
        message = refused.value.message
        assert message.startswith("CA key root-2 would get the CRL and CA URLs of CA key ca-root-1, so it was not created: ")
        assert f"ca.crl_distribution_points URL {url!r}" in message
        assert "write 'http://127.0.0.1:8080/crl/ca-root-1.crl'" in message
    assert [key.key_id for key in setup.store.list_ca_keys()] == ["ca-root-1"]
    with pytest.raises(NotFound):  # nor in the token
        setup.hsm.public_key_der(Pkcs11Uri(token=setup.hsm.token_label, label="root-2"))
    events = [e for e in setup.store.audit_events() if e["action"] == "key.generate" and e["outcome"] == "refused"]
    assert [(e["actor"], e["key_id"], e["reason"]) for e in events] == [("alice", "root-2", "key-urls")] * 2
    # The configured URLs name ca-root-1 in their path: root-2 gets URLs of its own.
    setup.new_root(setup.ceremony(), "root-2")
    made = setup.store.get_ca_key("root-2")
    assert made is not None and made.status == KeyStatus.PENDING
    assert setup.hsm.public_key_der(Pkcs11Uri(token=setup.hsm.token_label, label="root-2")) == made.public_key_der


def test_generate_key_over_grpc_is_refused_while_the_cdp_does_not_name_the_key(tmp_path: Path, softhsm_conf: Path) -> None:
    """The gRPC GenerateKey (`ca-daemon key create`) of a daemon whose CDP does not name its key: FAILED_PRECONDITION
    saying which URL and what to write instead; no key is listed."""
    env, http_port = crl_env(tmp_path, softhsm_conf)
    env.edit_config("/crl/ca-root-1.crl", "/factory.crl")
    daemon = start(env, tmp_path)
    try:
        with grpc.insecure_channel(env.target) as channel:
            ceremony = ca_pb2_grpc.KeyCeremonyStub(channel)
            with pytest.raises(grpc.RpcError) as refused:
                ceremony.GenerateKey(ca_pb2.GenerateKeyRequest(label="root-2"), timeout=60)
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            details = refused.value.details() or ""
            assert f"ca.crl_distribution_points URL 'http://127.0.0.1:{http_port}/factory.crl' does not have the key's label" in details
            assert f"write 'http://127.0.0.1:{http_port}/crl/ca-root-1.crl'" in details
            assert [k.key_id for k in ceremony.ListKeys(ca_pb2.ListKeysRequest(), timeout=30).keys] == ["ca-root-1"]
    finally:
        daemon.stop()


def test_the_first_start_records_when_it_activated_the_configured_key(setup: Setup) -> None:
    """The first start activated the configured key and audited it, but left its activated_at unset: `key status` and
    ListKeys showed the signing key active with no activation time."""
    activated = RotationStore(setup.store).lifecycle("ca-root-1").get("activated_at")
    events = [e for e in setup.store.audit_events() if e["action"] == "key.activate" and e["key_id"] == "ca-root-1"]
    assert activated is not None and len(events) == 1, (activated, events)
    audited = datetime.fromisoformat(str(events[0]["time"]))
    assert abs((activated - (audited if audited.tzinfo else audited.replace(tzinfo=UTC))).total_seconds()) < 1
    listed = next(info for info in setup.ceremony().list_keys() if info.key.key_id == "ca-root-1")
    assert listed.lifecycle.get("activated_at") == activated


def test_no_link_certificate_is_made_with_a_key_an_emergency_halted(setup: Setup) -> None:
    """While an emergency runs (here: halted by two approvals, the switch not yet made), a new root is self-signed. A link
    certifying the compromised key would chain its certificates to the new root after the emergency listed the links to
    revoke: the new key is installed with none, and a link with the halted key is refused by the store (rule key-halted),
    nothing recorded."""
    setup.new_root(setup.ceremony(), "root-2")
    rotation = RotationStore(setup.store)
    now = datetime.now(UTC).replace(microsecond=0)
    window = timedelta(minutes=10)
    for officer in ("alice", "bob"):
        approval = AuditEvent(time=now, actor=officer, action="key.approve", outcome="approved", key_id="ca-root-1", details={})
        rotation.approve("emergency", "ca-root-1", "root-2", officer, now, window, approval)
    halt = AuditEvent(time=now, actor="bob", action="key.emergency", outcome="halted", key_id="ca-root-1", details={})
    assert rotation.halt("ca-root-1", "root-2", now, window, halt)
    links_before = rotation.links()
    ceremony = setup.ceremony()
    ceremony.generate("carol", KeySpec.EC_P256, "root-3")
    made = ceremony.self_sign("carol", "root-3", issuer.parse_subject("CN=root-3"), timedelta(days=30))
    assert made.links == () and made.key.certificate_der is not None
    assert rotation.links() == links_before
    link = links_before[0]  # root-1 certifying root-2, made before the emergency: the same link again, with a new serial
    again = dataclasses.replace(link, serial=link.serial + 1, request_id=link.request_id + ":again")
    event = AuditEvent(time=now, actor="carol", action="key.link", outcome="issued", key_id="root-2", details={})
    with pytest.raises(FailedPrecondition, match="CA key ca-root-1 is halted by a key emergency") as refused:
        rotation.record_link(again, event)
    assert refused.value.rule == "key-halted"
    assert setup.store.get_certificate(again.serial) is None and rotation.links() == links_before
