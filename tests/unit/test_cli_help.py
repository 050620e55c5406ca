"""`--help` of every `ota` command says what it does and what each option means."""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Iterator

from ota.cli.commands_ops import _plan_from_flags
from ota.cli.main import build_parser


def _commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ("ota",)
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            seen: set[int] = set()
            for name, sub in action.choices.items():
                if id(sub) not in seen:  # an alias (`token`) is the same parser
                    seen.add(id(sub))
                    yield from _commands(sub, (*path, name))


def test_every_command_has_a_description_and_every_option_a_help() -> None:
    missing = []
    for path, parser in _commands(build_parser()):
        if len(path) > 1 and not parser.description:
            missing.append(" ".join(path))
        for action in parser._actions:
            if not action.help and not isinstance(action, argparse._SubParsersAction):
                missing.append(f"{' '.join(path)} {'/'.join(action.option_strings) or action.dest}")
    assert missing == []


def test_the_examples_of_rollout_create_parse_and_carry_their_units() -> None:
    parser = build_parser()
    epilog = dict(_commands(parser))[("ota", "rollout", "create")].epilog or ""
    examples = epilog.replace("\\\n", " ").splitlines()
    commands = [shlex.split(line) for line in examples if line.strip().startswith("ota ")]
    assert len(commands) >= 2
    shares = 0
    for argv in commands:
        args = parser.parse_args(argv[1:])
        if args.plan is None:
            plan = _plan_from_flags(args)  # raises on a bare share or a bad duration
            shares += len(plan.stages)
    assert shares > 0
