"""`ca-daemon ... --help`: every option of every command says what it is for."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

from ca_daemon import cli


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
