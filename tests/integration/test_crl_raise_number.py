"""`ca-daemon crl raise-number --above N` takes N as the operator reads it from the newest CRL (deploy/README.md)."""

from __future__ import annotations

import sqlite3
import subprocess
from pathlib import Path

import pytest

from tests.conftest import Daemon, make_env


def test_the_floor_takes_the_crl_number_as_openssl_prints_it(tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path) -> None:
    """After a restore the operator reads `openssl crl -noout -crlnumber` of the newest CRL relying parties saw,
    which prints hex (`crlNumber=0x05`): `--above` refused that (invalid int value), and the hex digits
    without their 0x would be taken as a smaller decimal number."""
    env = make_env(tmp_path_factory.mktemp("floor"), softhsm_conf)
    Daemon(env, env.state_dir / "daemon.log").start().stop()  # its first start records the CA key and publishes CRL 1
    # The CRL relying parties saw is CRL 26 (0x1A): make it from the store's own, numbered up to there.
    env.cli("crl", "raise-number", "--issuer", "ca-root-1", "--above", "25")
    assert "published full CRL 26 of ca-root-1" in env.cli("crl", "publish").stdout
    with sqlite3.connect(env.state_dir / "ca.db") as db:
        (der,) = db.execute("SELECT der FROM crls WHERE issuer_key_id = 'ca-root-1' AND crl_number = 26").fetchone()
    crl_file = env.state_dir / "crl-26.der"
    crl_file.write_bytes(der)
    printed = subprocess.run(
        ["openssl", "crl", "-inform", "DER", "-in", str(crl_file), "-noout", "-crlnumber"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert printed == "crlNumber=0x1A"

    assert "numbered above 26" in env.cli("crl", "raise-number", "--issuer", "ca-root-1", "--above", printed).stdout
    assert "numbered above 100" in env.cli("crl", "raise-number", "--issuer", "ca-root-1", "--above", "0x64").stdout
    assert "published full CRL 101 of ca-root-1" in env.cli("crl", "publish").stdout

    ambiguous = env.cli("crl", "raise-number", "--issuer", "ca-root-1", "--above", "1A", check=False)
    assert ambiguous.returncode == 2, ambiguous
    assert "in hex with its 0x (0x1A)" in ambiguous.stderr, ambiguous.stderr
