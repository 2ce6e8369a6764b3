"""`ca-daemon ... --help`: every option of every command says what it is for."""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from ca_daemon import cli

ROOT = Path(__file__).resolve().parents[2]


def _commands(parser: argparse.ArgumentParser, path: str = "ca-daemon") -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, f"{path} {name}")


def test_every_option_of_every_command_has_help() -> None:
    """A walk through the README found `client get --serial`, `ca csr --label`, `key csr --subject`, `crl publish --delta`
    and some thirty more listed by --help with nothing beside them."""
    commands = dict(_commands(cli._parser()))
    assert {"ca-daemon client unrevoke", "ca-daemon key csr", "ca-daemon mtls issue"} <= set(commands)
    silent = [
        f"{path} {'/'.join(action.option_strings) or action.dest}"
        for path, parser in commands.items()
        for action in parser._actions
        if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) and not action.help
    ]
    assert silent == []
    for path, parser in commands.items():
        assert parser.format_help(), path  # a stray % in a help string fails here, not when a user asks


def test_every_command_a_message_points_at_is_documented() -> None:
    """`init --csr-out` for a key that has its certificate says to run `ca-daemon ca csr --label LABEL`, a command
    README.md never mentioned (found by a walk through the README as a new user)."""
    docs = " ".join((ROOT / name).read_text() for name in ("README.md", "deploy/README.md", "deploy/ca-daemon.service"))
    docs = re.sub(r"ca-daemon --config \S+ ", "ca-daemon ", docs)
    named = {
        (match.group(1), path.name)
        for path in sorted((ROOT / "ca_daemon").glob("*.py"))
        for match in re.finditer(r"`ca-daemon ([a-z][a-z-]*(?: [a-z][a-z-]*)?)", path.read_text())
    }
    assert named, "the pattern no longer finds the commands messages name"
    assert sorted((command, where) for command, where in named if f"ca-daemon {command}" not in docs) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # 0 days made server and client certificates expired when written (exit 0); too many days an OverflowError traceback.
        (["mtls", "init", "--out", "x", "--days", "0"], "argument --days: 0 is out of range: give 1 to 3650 days"),
        (["mtls", "issue", "--out", "x", "--client", "a:admin", "--days", "99999999999"], "argument --days: 99999999999 is out of range"),
        (["mtls", "renew-server", "--days", "-1"], "argument --days: -1 is out of range: give 1 to 3650 days"),
        (["mtls", "revoke", "--serial", "1a", "--reason", "99"], "argument --reason: invalid choice: 99"),
        (["ca", "verification-cert", "--code", "c", "--out", "x", "--validity-days", "99999999999"], "give 1 to 30 days"),
        (["key", "self-sign", "--key-id", "k", "--subject", "CN=x", "--validity-days", "-1"], "give 1 to 36500 days"),
        # --retries -1 ended in an AssertionError traceback; a timeout of 0 or below made every call time out, retried.
        (["client", "ca-certs", "--retries", "-1"], "argument --retries: -1 is out of range: give 0 to 100"),
        (["client", "ca-certs", "--timeout", "0"], "argument --timeout: 0 is out of range: give more than 0 and at most 86400 seconds"),
        (["client", "ca-certs", "--timeout", "nan"], "argument --timeout: nan is out of range"),
        (["simulate-factory", "--devices", "1", "--timeout", "-1"], "argument --timeout: -1 is out of range"),
        (["mtls", "init", "--out", "x", "--days", "a week"], "argument --days: 'a week' is not a whole number"),
    ],
)
def test_a_number_out_of_range_is_a_usage_error_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["--config", str(tmp_path / "none.toml"), *args])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_profile_validities_are_listed_in_the_unit_that_shows_them() -> None:
    """`profiles list` showed a validity_seconds of an hour as "validity 0 days"."""
    assert [cli.duration_text(s) for s in (86400, 365 * 86400, 3600, 7200, 90, 100_000)] == [
        "1 day",
        "365 days",
        "1 hour",
        "2 hours",
        "90 s",
        "100000 s",
    ]
