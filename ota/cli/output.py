"""Printing data: a rich table for people, JSON for scripts (`--format json`).

The JSON convention (`plain`, `emit_page`): field names as in the proto
(snake_case); every field present, `null` when a message field is unset;
integers as JSON numbers (int64 too), hashes and other bytes in lowercase
hex, enums by their whole proto name (`ROLLOUT_STATE_RUNNING`), times as RFC 3339 UTC strings, durations in seconds as
numbers; a list is an object with the items under their plural name and
`next_page_token` ("" on the last page).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from rich.console import Console
from rich.table import Table

console = Console()
# `--wide`, set once per command by the entry point: every table then keeps every column whole.
wide_tables = False


def emit_json(value: Any) -> None:
    """One JSON document on stdout; messages anywhere in it as `plain` has them."""
    json.dump(_jsonable(value), sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def _jsonable(value: Any) -> Any:
    if isinstance(value, Message):
        return plain(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def plain(message: Message) -> dict[str, Any]:
    """A message as the JSON convention above has it."""
    out: dict[str, Any] = {}
    fields: Any = message.DESCRIPTOR.fields
    for field in fields:
        value = getattr(message, field.name)
        if _is_map(field):
            value_field = field.message_type.fields_by_name["value"]
            out[field.name] = {str(k): _value(value_field, v) for k, v in value.items()}
        elif _is_repeated(field):
            out[field.name] = [_value(field, v) for v in value]
        elif field.type == FieldDescriptor.TYPE_MESSAGE and not message.HasField(field.name):
            out[field.name] = None
        else:
            out[field.name] = _value(field, value)
    return out


# Descriptors are typed loosely by protobuf's stubs (two implementations): Any here.
def _is_repeated(field: Any) -> bool:
    return bool(field.is_repeated)


def _is_map(field: Any) -> bool:
    return (
        _is_repeated(field)
        and field.type == FieldDescriptor.TYPE_MESSAGE
        and field.message_type.GetOptions().map_entry
    )


def _value(field: Any, value: Any) -> Any:
    if isinstance(value, Timestamp):
        return value.ToJsonString()
    if isinstance(value, Duration):
        return value.ToTimedelta().total_seconds()
    if isinstance(value, Message):
        return plain(value)
    if field.type == FieldDescriptor.TYPE_BYTES:
        return bytes(value).hex()
    if field.type == FieldDescriptor.TYPE_ENUM:
        enum = field.enum_type.values_by_number.get(value)
        return enum.name if enum is not None else value
    return value


def emit_page(items_name: str, items: Sequence[Message], next_page_token: str = "") -> None:
    """A list, as scripts read every list: items and the token of the next page."""
    emit_json({items_name: [plain(i) for i in items], "next_page_token": next_page_token})


def table(
    title: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[object]],
    *,
    whole: Sequence[int] = (0,),
    wide: bool | None = None,
) -> None:
    """A table for people. Columns in `whole` (by default the first, the identifier) are
    never cut or wrapped, however narrow the terminal, so they can be copied back into a
    command; the others give way. `wide` (`--wide`) keeps every column whole and lets the
    table run past the terminal's width rather than cut anything."""
    wide = wide_tables if wide is None else wide
    if wide:
        whole = range(len(columns))
    t = Table(title=title, title_justify="left")
    widths = []
    for i, c in enumerate(columns):
        keep = i in whole
        widest = max([len(c), *(len(str(row[i])) for row in rows)]) if keep else None
        widths.append(widest or len(c))
        # The others fold rather than cut: a value cut to "3e64d9…" is lost for copying.
        t.add_column(c, no_wrap=keep, min_width=widest, overflow="fold")
    for row in rows:
        t.add_row(*(str(v) for v in row))
    if not wide:
        console.print(t)
        return
    # Cells, one space of padding either side, and the borders between and around them.
    need = sum(widths) + 3 * len(widths) + 1
    # console.print(width=) never exceeds the terminal's width: a console of its own does.
    Console(width=max(console.width, need)).print(t, crop=False)
