"""Checks every request gets before its servicer: text a database can store.

A NUL character is valid UTF-8, so protobuf accepts it in a string field, but
PostgreSQL refuses it in any text column: without this check it would surface
as INTERNAL from whichever query met it first. One walk over the request,
naming the field, keeps every servicer free of the concern.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from ota.errors import InvalidArgument


def screened(request: Any) -> Any:
    """The request, checked; a client stream is checked message by message as it is read."""
    if isinstance(request, Message):
        refuse_nul(request)
        return request
    return _each(request)


def _each(messages: Iterator[Message]) -> Iterator[Message]:
    for message in messages:
        refuse_nul(message)
        yield message


def refuse_nul(message: Message, prefix: str = "") -> None:
    """InvalidArgument naming the first string field (at any depth) holding a NUL character."""
    for field, value in message.ListFields():
        name = prefix + field.name
        if field.type == FieldDescriptor.TYPE_STRING:
            items = enumerate(value) if field.is_repeated else [(None, value)]
            for i, text in items:
                if "\x00" in text:
                    raise InvalidArgument(
                        "must not contain NUL characters",
                        field=name if i is None else f"{name}[{i}]",
                    )
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            entry = field.message_type
            if entry is not None and entry.GetOptions().map_entry:
                _map(entry, value, name)
            elif field.is_repeated:
                for i, item in enumerate(value):
                    refuse_nul(item, f"{name}[{i}].")
            else:
                refuse_nul(value, name + ".")


def _map(entry: Descriptor, entries: Any, name: str) -> None:
    key_type = entry.fields_by_name["key"].type
    value_field = entry.fields_by_name["value"]
    for key, item in entries.items():
        if key_type == FieldDescriptor.TYPE_STRING and "\x00" in key:
            raise InvalidArgument("keys must not contain NUL characters", field=name)
        if value_field.type == FieldDescriptor.TYPE_STRING and "\x00" in item:
            raise InvalidArgument("must not contain NUL characters", field=f"{name}[{key!r}]")
        if value_field.type == FieldDescriptor.TYPE_MESSAGE:
            refuse_nul(item, f"{name}[{key!r}].")
