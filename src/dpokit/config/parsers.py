"""Option values written as small languages: --columns, --chat-template-kwargs,
--malloc-mmap-threshold and --memory-budget.

They live with the config (the bottom layer) so that validation can parse them before any model
is loaded; the data readers import them from here.
"""

from __future__ import annotations

import json
from typing import Any

from dpokit.config.choices import COLUMN_TARGETS, RESERVED_TEMPLATE_ARGS
from dpokit.errors import DpokitError


def parse_columns(spec: str | None) -> dict[str, str]:
    """`prompt=question,chosen=good` -> {"prompt": "question", "chosen": "good"}."""
    if not spec:
        return {}
    mapping = {}
    for item in spec.split(","):
        target, eq, source = (part.strip() for part in item.partition("="))
        if not eq or not target or not source:
            raise DpokitError(f"--columns: expected NAME=COLUMN pairs separated by commas; got {item.strip()!r}")
        if target not in COLUMN_TARGETS:
            raise DpokitError(f"--columns: unknown name '{target}'; use {', '.join(COLUMN_TARGETS)}")
        if target in mapping:
            raise DpokitError(f"--columns: '{target}' is mapped twice")
        mapping[target] = source
    return mapping


def parse_template_kwargs(value: str | dict | None) -> dict[str, Any]:
    """`--chat-template-kwargs` (JSON text, or a mapping from YAML) -> a dict; bad input is one line."""
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise DpokitError(f"--chat-template-kwargs: not valid JSON ({exc.msg} at column {exc.colno}); in YAML "
                              "write it as a quoted JSON string") from None
    if not isinstance(value, dict):
        raise DpokitError(f"--chat-template-kwargs: expected a JSON object such as '{{\"enable_thinking\": false}}', "
                          f"got {type(value).__name__}")
    reserved = sorted(set(value) & set(RESERVED_TEMPLATE_ARGS))
    if reserved:
        raise DpokitError(f"--chat-template-kwargs: {', '.join(reserved)} is set by dpokit itself, not a template argument")
    return value


def parse_mmap_threshold(value: str | int) -> int | None:
    """`--malloc-mmap-threshold`: "auto" -> None (decided from the data's longest row), else the
    whole number of bytes it gives (0: leave malloc's adaptive threshold); bad input is one line."""
    text = str(value).strip()
    if text == "auto":
        return None
    if not text.isdigit():
        raise DpokitError(f"--malloc-mmap-threshold must be auto or a whole number of bytes >= 0 "
                          f"(0: malloc's adaptive threshold); got {text!r}")
    return int(text)


_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory_budget(value: str | int | None) -> int | str | None:
    """`--memory-budget`: None (no plan), "auto" (the device's free memory, decided at run time), or
    a size in bytes from `8GiB`, `1500MB`, `12e9` (decimal kB/MB/GB, binary KiB/MiB/GiB; a bare
    number is bytes); bad input is one line naming the option."""
    if value is None or str(value).strip() in ("", "none"):
        return None
    text = str(value).strip()
    if text.lower() == "auto":
        return "auto"
    number = text.rstrip("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ").strip()
    unit = text[len(number):].strip().lower() if number else ""
    try:
        size = float(number)
    except ValueError:
        size = -1.0
    if unit not in _SIZE_UNITS or not size > 0 or size * _SIZE_UNITS[unit] < 2**20:
        raise DpokitError(f"--memory-budget must be auto or a size of at least 1 MiB such as 8GiB or 1500MB; got {text!r}")
    return int(size * _SIZE_UNITS[unit])
