"""How an option is declared, typed and converted from YAML or command-line text.

Each option is a dataclass field with its help text in `metadata["help"]` (and optionally
`choices`, `flag` where the command line wants another name, or `path`: INPUT for a file or
folder read, which may also be a hub id, OUTPUT for one written). `@section` makes such a
dataclass: it resolves the annotations once with `typing.get_type_hints`, so `coerce` reads a
real type (bool, int, float, str, `X | None`, or `tuple[X, ...]` for a list), and it converts
every value given to the constructor, so a section never holds a value of the wrong type: a
list option given as "sigmoid,sft" holds ("sigmoid", "sft") from then on.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any

from dpokit.errors import DpokitError

_SCALARS = (bool, int, float, str)
_NONE_WORDS = ("none", "null")  # an optional option given as this text is unset
# `path` metadata: a local file or folder the run reads (or a hub id), or one it writes.
INPUT, OUTPUT = "input", "output"


def option(default: Any, help: str, **extra: Any) -> Any:
    """A dataclass field with its help text (and optional `choices` or `flag`) in the metadata."""
    return dataclasses.field(default=default, metadata={"help": help, **extra})


def flag_of(f: dataclasses.Field) -> str:
    """The command-line flag of a field: `metadata["flag"]`, else --the-field-name."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


@dataclasses.dataclass(frozen=True)
class Kind:
    """What a field holds: `base` values, possibly None, possibly a tuple of them."""

    base: type
    optional: bool = False
    is_list: bool = False

    @property
    def name(self) -> str:
        return f"comma-separated {self.base.__name__} values" if self.is_list else self.base.__name__


@functools.cache
def kind_of_type(annotation: Any) -> Kind:
    """The Kind of a resolved annotation; anything else is a programming error, raised at import."""
    args = typing.get_args(annotation)
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1 or len(args) != 2:
            raise TypeError(f"unsupported option type {annotation!r}")
        return dataclasses.replace(kind_of_type(rest[0]), optional=True)
    if typing.get_origin(annotation) is tuple and len(args) == 2 and args[1] is Ellipsis and args[0] in _SCALARS:
        return Kind(args[0], is_list=True)
    if annotation in _SCALARS:
        return Kind(annotation)
    raise TypeError(f"unsupported option type {annotation!r}")


def kind_of(f: dataclasses.Field) -> Kind:
    return kind_of_type(f.type)


def section(cls: type) -> type:
    """Make `cls` a dataclass of options: annotations resolved, values coerced on construction."""
    cls.__post_init__ = _coerce_fields  # type: ignore[attr-defined]
    cls = dataclasses.dataclass(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        f.type = hints[f.name]  # the real type instead of the annotation's text
        kind_of(f)  # an unsupported annotation fails here, at import
    return cls


def _coerce_fields(self: Any) -> None:
    for f in dataclasses.fields(self):
        setattr(self, f.name, coerce(getattr(self, f.name), f, flag_of(f)))


def coerce(value: Any, f: dataclasses.Field, where: str) -> Any:
    """Convert a YAML or CLI value to the field's type, or fail with a message naming `where`."""
    kind = kind_of(f)
    # An optional list given as "" is unset too (--loss-weights "": one weight per loss).
    none_words = (*_NONE_WORDS, "") if kind.is_list else _NONE_WORDS
    if value is None or (kind.optional and isinstance(value, str) and value.strip().lower() in none_words):
        if kind.optional:
            return None
        raise DpokitError(f"{where}: a value is required")
    try:
        if kind.is_list:
            return tuple(_scalar(item, kind.base) for item in parse_list(value, where))
        return _scalar(value, kind.base)
    except (TypeError, ValueError):
        raise DpokitError(f"{where}: expected {kind.name}, got {value!r}") from None



def _scalar(value: Any, base: type) -> Any:
    if base is bool:
        if isinstance(value, bool):
            return value
        text = str(value).lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ValueError
    if base in (int, float) and isinstance(value, bool):
        raise ValueError  # YAML's true/false are ints to Python, never a count or a rate
    if base is int:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError
        if isinstance(value, str):
            return int(float(value)) if "e" in value.lower() else int(value)
        return int(value)
    return base(value)


def parse_list(value: Any, where: str) -> list:
    """A list option's items: a YAML list as is; text split on commas ("sigmoid, sft").

    Also reads the text an older dpokit wrote for a YAML list ("['sigmoid', 'sft']"), so the
    dpokit_config.yaml of older run folders still loads. An empty item is an error.
    """
    if isinstance(value, (list, tuple)):
        return list(value)
    if not isinstance(value, str):
        return [value]
    text = value.strip()
    if text[:1] + text[-1:] in ("[]", "()"):
        text = text[1:-1]
    if not text.strip():
        return []
    items = [item.strip().strip("'\"").strip() for item in text.split(",")]
    if not all(items):
        raise DpokitError(f"{where}: empty item in {value!r}")
    return items


def format_value(value: Any) -> str:
    """A value as the command line writes it: lists comma-separated, numbers as given."""
    if isinstance(value, tuple):
        return ",".join(format(v, "g") if isinstance(v, float) else str(v) for v in value)
    return str(value)
