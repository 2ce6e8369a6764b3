"""`ca-daemon check-config` and `ca-daemon db migrate` against a real token, SQLite and PostgreSQL."""

from __future__ import annotations

import socket
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ca_daemon.store import schema
from tests.conftest import CA_DAEMON, daemon_environment, free_port, make_env


def _lines(stdout: str) -> dict[str, str]:
    return {line.split(":", 1)[0][6:]: line[:4] for line in stdout.splitlines()}


def test_check_config_reports_each_check_and_fails_on_any(tmp_path: Path, softhsm_conf: Path, pg_database: Callable[[], str]) -> None:
    env = make_env(tmp_path, softhsm_conf)
    ok = env.cli("check-config")
    assert _lines(ok.stdout) == {
        "configuration": "ok  ",
        "PKCS#11 module": "ok  ",
        "PIN": "ok  ",
        "tls": "ok  ",
        "database": "ok  ",
        "token": "ok  ",
        "CA key": "ok  ",
        "profiles": "ok  ",
        "served URLs": "ok  ",
    }, ok.stdout
    assert env.user_pin not in ok.stdout + ok.stderr

    # A fresh PostgreSQL database: reachable, but needs `db migrate`; then the CA key is unknown to it.
    url = pg_database()
    env.edit_config('url = "sqlite:///ca.db"', f'url = "{url}"')
    fresh = env.cli("check-config", check=False)
    assert fresh.returncode == 1 and "FAIL  database" in fresh.stdout and "db migrate" in fresh.stdout, fresh.stdout
    migrated = env.cli("db", "migrate")
    assert "schema at version" in migrated.stdout
    assert env.cli("db", "migrate").stdout.endswith("(up to date)\n")
    after = env.cli("check-config", check=False)
    assert after.returncode == 1 and _lines(after.stdout)["database"] == "ok  " and _lines(after.stdout)["CA key"] == "FAIL", after.stdout
    assert "postgresql" in after.stdout

    # A wrong PIN fails the token check with a reason, and never prints the PIN.
    pin_file = env.state_dir / "pins" / "user.pin"
    pin_file.write_text("0000\n")
    wrong = env.cli("check-config", check=False)
    assert wrong.returncode == 1 and _lines(wrong.stdout)["token"] == "FAIL", wrong.stdout


def test_key_uris_without_a_token_are_keys_in_hsm_token_and_another_token_is_refused(tmp_path: Path, softhsm_conf: Path) -> None:
    """A ca.key or audit.key without token= passed check-config, then init refused it, or serve stopped with "the audit
    checkpoint key pkcs11:object=audit-1 is not in the token; run `ca-daemon init`". One naming another token than
    hsm.token passed check-config too, and serve used the key of that label in hsm.token."""
    env = make_env(tmp_path, softhsm_conf, init=False)
    env.edit_config(f"pkcs11:token={env.token};", "pkcs11:")  # ca.key and audit.key; hsm.token names the token
    env.cli("init", "--key-type", "ec-p256")
    assert _lines(env.cli("check-config").stdout)["CA key"] == "ok  "
    env.cli("audit", "public-key", "--out", str(tmp_path / "audit.pem"))
    assert (tmp_path / "audit.pem").read_text().startswith("-----BEGIN PUBLIC KEY-----")

    env.edit_config('key = "pkcs11:object=audit-1"', 'key = "pkcs11:token=other;object=audit-1"')
    refused = env.cli("check-config", check=False)
    assert refused.returncode == 1 and _lines(refused.stdout) == {"configuration": "FAIL"}, refused.stdout + refused.stderr
    assert f"audit.key = 'pkcs11:token=other;object=audit-1' names token 'other', but hsm.token = '{env.token}'" in refused.stdout


def test_a_key_usage_a_key_type_of_the_profile_cannot_have_is_refused_by_check_config_and_serve(tmp_path: Path, softhsm_conf: Path) -> None:
    """keyAgreement in the development profile, which allows RSA and Ed25519 keys beside EC ones, passed check-config and
    started: its template (an EC key, as the CA key is) passed the lint, and then every Sign for an RSA or Ed25519 key
    was refused by the lint ('pkix.key_usage_value_prohibited_for_rsa'), or with the lint off issued against RFC 3279 and
    RFC 8410. The configuration is refused, naming the profile, the usage, the key types and what to do."""
    env = make_env(tmp_path, softhsm_conf)
    env.edit_config('key_usage = ["digitalSignature"]', 'key_usage = ["digitalSignature", "keyAgreement"]')
    expected = (
        "profiles.device.key_usage: keyAgreement is prohibited for RSA and Ed25519 keys (RSA: RFC 3279 and RFC 4055, Ed25519: RFC 8410)"
    )
    advice = (
        "remove keyAgreement from key_usage, or split the profile by key type: one profile for EC keys with keyAgreement "
        "(rsa_max_bits = 0, ed25519 = false), another for RSA and Ed25519 keys without it (ec_curves = [])"
    )
    for lint in ("template", "off"):
        env.edit_config('mode = "template"', f'mode = "{lint}"')
        refused = env.cli("check-config", check=False)
        assert refused.returncode == 1 and _lines(refused.stdout) == {"configuration": "FAIL"}, refused.stdout + refused.stderr
        assert expected in refused.stdout and advice in refused.stdout, refused.stdout
        served = env.cli("serve", check=False)  # stops at once: nothing is served
        assert served.returncode != 0 and expected in served.stderr, served.stderr[-2000:]
        assert not (env.state_dir / "ca-daemon.pid").exists()
    # The EC keys' profile, split off as the message says, is accepted.
    env.edit_config('mode = "off"', 'mode = "template"')
    env.edit_config("rsa_max_bits = 8192", "rsa_max_bits = 0")
    env.edit_config("ed25519 = true", "ed25519 = false")
    assert _lines(env.cli("check-config").stdout)["configuration"] == "ok  "


def test_serve_names_the_metrics_address_it_cannot_listen_on(tmp_path: Path, softhsm_conf: Path) -> None:
    """A taken metrics port stopped the daemon with only "[Errno 98] Address already in use": which of the addresses?"""
    env = make_env(tmp_path, softhsm_conf)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env.edit_config('[metrics]\nlisten = ""', f'[metrics]\nlisten = "127.0.0.1:{port}"')
        result = env.cli("serve", check=False)
    assert result.returncode != 0
    assert f"metrics.listen = '127.0.0.1:{port}': cannot listen there: Address already in use" in result.stderr, result.stderr
    # It stopped after writing its pid file, and left it: `ca-daemon reload` would signal whatever process gets that pid.
    assert not (env.state_dir / "ca-daemon.pid").exists()


def test_reload_signals_no_process_through_a_stale_pid_file(tmp_path: Path, softhsm_conf: Path) -> None:
    """A daemon killed with SIGKILL leaves its pid file; the pid may since belong to another process, which SIGHUP ends."""
    env = make_env(tmp_path, softhsm_conf)
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        (env.state_dir / "ca-daemon.pid").write_text(f"{bystander.pid}\n")
        result = env.cli("reload", check=False)
        assert result.returncode != 0 and "no running ca-daemon found" in result.stderr and "stale" in result.stderr, result.stderr
        time.sleep(0.2)
        assert bystander.poll() is None, "the process named by the stale pid file was signalled"
    finally:
        bystander.kill()
        bystander.wait()


def _in_namespace_with_hosts(hosts: Path) -> list[str]:
    """A command prefix running a process in a private mount namespace whose /etc/hosts is hosts (a real resolver, real file)."""
    prefix = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"', str(hosts)]
    probe = subprocess.run([*prefix, "true"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"cannot give a process its own /etc/hosts here (unshare --user --mount): {probe.stderr.strip()}")
    return prefix


def test_development_mode_accepts_a_listen_name_only_if_it_resolves_to_loopback_alone(tmp_path: Path, softhsm_conf: Path) -> None:
    """server.listen = "localhost:PORT" was taken for loopback on its name, unresolved: where /etc/hosts (or DNS) also maps
    localhost to a network address, gRPC binds that address too, and the plaintext development server was reachable from
    the network. Now the name is resolved and every address must be loopback; metrics.listen likewise."""
    env = make_env(tmp_path, softhsm_conf, init=False)
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n192.0.2.7 localhost\n127.0.0.2 ca-dev.test\n::1 ca-dev.test\n")
    prefix = _in_namespace_with_hosts(hosts)

    def check_config() -> subprocess.CompletedProcess[str]:
        command = [*prefix, CA_DAEMON, "--config", str(env.config_path), "check-config"]
        return subprocess.run(command, capture_output=True, text=True, env=daemon_environment(), timeout=120, check=False)

    env.edit_config(f'listen = "{env.target}"', f'listen = "localhost:{env.port}"')
    refused = check_config()
    assert refused.returncode == 1 and _lines(refused.stdout) == {"configuration": "FAIL"}, refused.stdout + refused.stderr
    assert f"server.listen = 'localhost:{env.port}' is not a loopback address: localhost resolves to 127.0.0.1, 192.0.2.7" in (
        refused.stdout
    ), refused.stdout

    env.edit_config(f'listen = "localhost:{env.port}"', f'listen = "ca-dev.test:{env.port}"')  # 127.0.0.2 and ::1 alone
    accepted = check_config()
    assert _lines(accepted.stdout)["configuration"] == "ok  ", accepted.stdout + accepted.stderr

    env.edit_config('[metrics]\nlisten = ""', f'[metrics]\nlisten = "localhost:{free_port()}"')
    metrics_refused = check_config()
    assert _lines(metrics_refused.stdout) == {"configuration": "FAIL"}, metrics_refused.stdout + metrics_refused.stderr
    assert "metrics.listen = 'localhost:" in metrics_refused.stdout and "resolves to 127.0.0.1, 192.0.2.7" in metrics_refused.stdout


def test_a_database_a_newer_release_migrated_is_refused_not_served(tmp_path: Path, softhsm_conf: Path) -> None:
    """After a downgrade (a newer release ran, then the older one was put back) the older release migrated nothing,
    found its own steps done and served the newer schema: rows written without the columns and tables the newer
    release relies on. check-config said 'ok', and a backup of it was restored as good. Now each refuses, naming both
    versions."""
    env = make_env(tmp_path, softhsm_conf)
    env.cli("db", "migrate")
    env.cli("db", "backup", "--out", str(tmp_path / "from-a-newer-release.db"))
    newer = schema.LATEST_VERSION + 1
    for database_file in (env.state_dir / "ca.db", tmp_path / "from-a-newer-release.db"):
        with sqlite3.connect(database_file) as database:
            database.execute(
                "INSERT INTO schema_migrations (version, description, applied_at) VALUES (?, 'a later release', '2027-01-01')", (newer,)
            )
    reason = f"schema is at version {newer}, newer than this release of ca-daemon knows (up to {schema.LATEST_VERSION})"
    checked = env.cli("check-config", check=False)
    assert checked.returncode == 1 and _lines(checked.stdout)["database"] == "FAIL" and reason in checked.stdout, checked.stdout
    migrated = env.cli("db", "migrate", check=False)
    assert migrated.returncode != 0 and reason in migrated.stderr, migrated.stdout + migrated.stderr
    served = env.cli("serve", check=False)  # stops at once: nothing is served
    assert served.returncode != 0 and reason in served.stderr, served.stderr[-2000:]
    assert not (env.state_dir / "ca-daemon.pid").exists()
    backed_up = env.cli("db", "backup", "--out", str(tmp_path / "newer.db"), check=False)
    assert backed_up.returncode != 0 and reason in backed_up.stderr and not (tmp_path / "newer.db").exists(), backed_up.stderr
    restored = env.cli("db", "restore", "--from", str(tmp_path / "from-a-newer-release.db"), "--accept-loss", check=False)
    assert restored.returncode != 0 and reason in restored.stderr, restored.stdout + restored.stderr
    assert not list(env.state_dir.glob("ca.db.before-restore-*")), "the refused backup was put in place"


def test_check_config_warns_of_urls_that_would_not_name_another_key(tmp_path: Path, softhsm_conf: Path) -> None:
    """One key works with a CDP that does not name it; a second would share it, so its creation is refused (rotation).
    check-config says so before that day, as a WARN: the exit code stays 0."""
    env = make_env(tmp_path, softhsm_conf)
    assert "CRL and CA URLs" not in env.cli("check-config").stdout
    env.edit_config("/crl/ca-root-1.crl", "/factory.crl")
    warned = env.cli("check-config")
    assert _lines(warned.stdout)["CRL and CA URLs"] == "WARN", warned.stdout
    (line,) = [line for line in warned.stdout.splitlines() if line.startswith("WARN  CRL and CA URLs")]
    assert line == (
        "WARN  CRL and CA URLs: another CA key would get the configured key's URLs, so creating one (`ca-daemon key generate`, "
        "the key ceremony's GenerateKey: rotation) is refused until they name the key: ca.crl_distribution_points URL "
        "'http://127.0.0.1:8080/factory.crl' does not have the key's label ca-root-1 in its path: write "
        "'http://127.0.0.1:8080/crl/ca-root-1.crl'; crl.delta_distribution_points URL 'http://127.0.0.1:8080/factory-delta.crl' "
        "does not have the key's label ca-root-1 in its path: write 'http://127.0.0.1:8080/crl/ca-root-1-delta.crl'. The URLs of "
        "every other key are the configured ones with its label in place of ca-root-1's, in the path as written (not "
        "percent-encoded, not in the host or query). Certificates issued so far keep the old URLs, which the daemon goes on "
        "serving to them once it has recorded them (any start with them configured does: start it once before changing "
        "them); one that only an earlier version served, keep served in front (a copy or redirect) until they expire"
    )
    env.edit_config("/factory.crl", "/crl/ca%2Droot-1.crl")
    encoded = env.cli("check-config").stdout
    assert "'http://127.0.0.1:8080/crl/ca%2Droot-1.crl' has ca-root-1 only percent-encoded in its path" in encoded, encoded


def test_an_empty_extended_key_usage_is_refused_with_the_lint_off(tmp_path: Path, softhsm_conf: Path) -> None:
    """`extended_key_usage = []` with `[lint] mode = "off"` passed check-config and serve, and every certificate got an
    empty extendedKeyUsage (RFC 5280 gives it at least one KeyPurposeId): cryptography could not parse the certificate's
    extensions ('error parsing asn1 value: ... InvalidSize { min: 1 ... actual: 0 }') and openssl verify -purpose
    sslclient refused it ('unsuitable certificate purpose'). The setting is refused, as an empty key_usage is."""
    env = make_env(tmp_path, softhsm_conf)
    env.edit_config('extended_key_usage = ["clientAuth"]', "extended_key_usage = []")
    env.edit_config('mode = "template"', 'mode = "off"')
    refused = env.cli("check-config", check=False)
    assert refused.returncode == 1 and _lines(refused.stdout)["configuration"] == "FAIL", refused.stdout
    assert "profiles.device.extended_key_usage must name at least one usage" in refused.stdout, refused.stdout
    # With a usage again, the profiles line does not claim a lint that is off.
    env.edit_config("extended_key_usage = []", 'extended_key_usage = ["clientAuth"]')
    passed = env.cli("check-config")
    assert "each profile's template is not linted ([lint] mode = off) and fits the CA key's chain" in passed.stdout, passed.stdout
