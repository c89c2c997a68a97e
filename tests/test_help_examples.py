"""Every example in every command's --help parses: the options exist, take the values given, and no required
option is missing (parsed by click without running the command, so the example's files need not exist)."""

from __future__ import annotations

import shlex

import click
import pytest
import typer

from vmc_fast.cli import app


def _examples() -> list[tuple[str, list[str]]]:
    """(command, argument list) of every `vmc-fast ...` line in the commands' epilogs."""
    group = typer.main.get_command(app)
    found = []
    for name, command in group.commands.items():
        for line in (command.epilog or "").splitlines():
            line = line.strip().removesuffix("\\n").strip()
            if line.startswith("vmc-fast "):
                words = shlex.split(line)
                assert words[1] == name, f"an example of {name} runs another command: {line}"
                found.append((name, words[2:]))
    return found


def test_every_command_with_options_shows_examples():
    names = {name for name, _ in _examples()}
    assert {"train", "generate", "export", "bench", "demo", "eval", "toy-pretrain"} <= names


@pytest.mark.parametrize("name, args", _examples(), ids=lambda value: " ".join(value) if isinstance(value, list)
                         else value)
def test_help_example_parses(name, args):
    command = typer.main.get_command(app).commands[name]
    try:
        command.make_context(name, list(args))
    except click.exceptions.ClickException as exc:
        pytest.fail(f"vmc-fast {name} {shlex.join(args)}: {exc.format_message()}")


def test_generate_reverse_is_a_three_way_switch():
    """Absent: the adapter's direction (None); --reverse / --no-reverse override it either way."""
    command = typer.main.get_command(app).commands["generate"]
    given = {args: command.make_context("generate", ["--prompt", "x", *args]).params["reverse"]
             for args in ((), ("--reverse",), ("--no-reverse",))}
    assert given == {(): None, ("--reverse",): True, ("--no-reverse",): False}
