"""Printing data: a rich table for people, JSON for scripts (`--format json`)."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from rich.console import Console
from rich.table import Table

console = Console()


def emit_json(value: Any) -> None:
    if isinstance(value, Message):
        value = MessageToDict(value, preserving_proto_field_name=True)
    elif isinstance(value, list) and value and isinstance(value[0], Message):
        value = [MessageToDict(v, preserving_proto_field_name=True) for v in value]
    json.dump(value, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    t = Table(title=title, title_justify="left")
    for i, c in enumerate(columns):
        # The first column is the identifier: never cut or wrapped, however narrow
        # the terminal, so it can be copied back into a command.
        widest = max((len(str(row[0])) for row in rows), default=0) if i == 0 else None
        t.add_column(c, no_wrap=i == 0, min_width=widest)
    for row in rows:
        t.add_row(*(str(v) for v in row))
    console.print(t)
