"""Reading a person's YAML or JSON document with bounded cost, before it is parsed.

Plan files (CLI and server) and simulator scenarios go through `load_document`.
It refuses, with one line naming the document, a text larger than `max_bytes`,
nested deeper than `max_depth`, or with more than `max_nodes` values once YAML
aliases are expanded. The checks walk PyYAML's event stream, which is iterative,
so a document of 3 000 nested `[` costs a refusal rather than a RecursionError
from the (recursive) composer, and an alias bomb a refusal rather than memory.
JSON is read as the YAML subset it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from ota.errors import InvalidArgument


@dataclass(frozen=True)
class DocumentLimits:
    max_bytes: int
    max_depth: int = 32
    max_nodes: int = 100_000


def load_document(text: str | bytes, *, field: str, what: str, limits: DocumentLimits) -> Any:
    """The parsed document; InvalidArgument(field) when it is too big, too deep or not YAML."""
    size = len(text.encode("utf-8", errors="replace") if isinstance(text, str) else text)
    if size > limits.max_bytes:
        raise InvalidArgument(
            f"{what} is {size} bytes, more than the {limits.max_bytes} accepted", field=field
        )
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    try:
        _check_shape(text, field=field, what=what, limits=limits)
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise InvalidArgument(f"{what} is not valid YAML or JSON{where}", field=field) from exc
    except (ValueError, OverflowError) as exc:
        # PyYAML's constructors raise these for a 5 000-digit integer or a 13th month.
        raise InvalidArgument(
            f"{what} holds a value that cannot be read: {str(exc).split(';')[0]}",
            field=field,
        ) from exc


def _check_shape(text: str, *, field: str, what: str, limits: DocumentLimits) -> None:
    # One frame per open collection: [anchor, values inside it so far].
    frames: list[list[Any]] = []
    sizes: dict[str, int] = {}  # anchor -> values its node expands to
    total = 0

    def add(count: int) -> None:
        nonlocal total
        total += count
        if frames:
            frames[-1][1] += count
        if total > limits.max_nodes:
            raise InvalidArgument(
                f"{what} holds more than {limits.max_nodes} values (aliases counted as expanded)",
                field=field,
            )

    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            if len(frames) >= limits.max_depth:
                raise InvalidArgument(
                    f"{what} is nested more than {limits.max_depth} levels deep", field=field
                )
            add(1)
            frames.append([event.anchor, 0])
        elif isinstance(event, yaml.CollectionEndEvent):
            anchor, inside = frames.pop()
            if anchor is not None:
                sizes[anchor] = inside + 1
            if frames:
                frames[-1][1] += inside
        elif isinstance(event, yaml.ScalarEvent):
            add(1)
            if event.anchor is not None:
                sizes[event.anchor] = 1
        elif isinstance(event, yaml.AliasEvent):
            # An alias to a node still open (a recursive structure) counts as one.
            add(sizes.get(event.anchor or "", 1))
