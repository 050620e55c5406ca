"""How `--help` reads: every command says what it does, examples keep their lines."""

from __future__ import annotations

import argparse
import textwrap


class ExamplesFormatter(argparse.HelpFormatter):
    """Wraps prose as usual but keeps indented lines (examples) exactly as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        out: list[str] = []
        prose: list[str] = []

        def flush() -> None:
            if prose:
                out.append(
                    textwrap.fill(
                        " ".join(prose), width, initial_indent=indent, subsequent_indent=indent
                    )
                )
                prose.clear()

        for line in text.splitlines():
            if line.startswith("  "):
                flush()
                out.append(indent + line)
            elif line.strip():
                prose.append(line.strip())
            else:
                flush()
                out.append("")
        flush()
        return "\n".join(out)


def describe_commands(parser: argparse.ArgumentParser) -> None:
    """Give every subcommand without a description its one-line summary as one.

    argparse shows a subcommand's `help` only in its parent's list, so `ota rollout start
    --help` would otherwise not say what `start` does.
    """
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        summaries = {choice.dest: choice.help for choice in action._choices_actions}
        for name, sub in action.choices.items():
            if sub.description is None and summaries.get(name):
                summary = str(summaries[name])
                sub.description = summary[0].upper() + summary[1:] + "."
            describe_commands(sub)
