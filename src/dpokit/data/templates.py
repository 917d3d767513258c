"""What a chat template is called with besides the messages: tool definitions and extra arguments.

- `tools`: a per-row column holding a list of JSON-schema function definitions (or that list as
  a JSON string, as parquet and hub datasets often store it), passed as `tools=`.
- Template arguments: `--chat-template-kwargs '{"enable_thinking": false}'` for every row, and a
  per-row `chat_template_kwargs` column (an object, or its JSON text) whose keys override the
  flag's for that row. Names the renderer sets itself (`messages`, `tools`,
  `add_generation_prompt`, ...) cannot be passed this way.
"""

from __future__ import annotations

import json
from typing import Any

from dpokit.config import RESERVED_TEMPLATE_ARGS as _RESERVED
from dpokit.config import parse_template_kwargs as parse_template_kwargs  # re-exported for the data readers
from dpokit.data.pairs import PreferencePair
from dpokit.data.sources import RowSkip

TOOLS_COLUMN = "tools"
KWARGS_COLUMN = "chat_template_kwargs"


def row_tools(pair: PreferencePair) -> list[dict] | None:
    """The row's tool definitions (None when it has none)."""
    tools = _decoded(pair.extra.get(TOOLS_COLUMN), TOOLS_COLUMN, "malformed_tools")
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list) or not all(isinstance(tool, dict) for tool in tools):
        raise RowSkip("malformed_tools", f"field '{TOOLS_COLUMN}' must be a list of JSON-schema objects, "
                                         f"got {type(tools).__name__}")
    return tools


def row_template_kwargs(pair: PreferencePair, defaults: dict[str, Any]) -> dict[str, Any]:
    """The flag's template arguments, overridden key by key by the row's `chat_template_kwargs`."""
    row = _decoded(pair.extra.get(KWARGS_COLUMN), KWARGS_COLUMN, "malformed_template_kwargs")
    if row is None:
        return defaults
    if not isinstance(row, dict) or set(row) & set(_RESERVED):
        raise RowSkip("malformed_template_kwargs", f"field '{KWARGS_COLUMN}' must be an object of template "
                                                   f"arguments (not {', '.join(_RESERVED[:3])}, ...)")
    return {**defaults, **row}


def has_tool_calls(messages) -> bool:
    return not isinstance(messages, str) and any("tool_calls" in m for m in messages)


def without_tool_calls(messages) -> list[dict]:
    return [{k: v for k, v in m.items() if k != "tool_calls"} for m in messages]


def _decoded(value: Any, name: str, reason: str) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value) if value.strip() else None
    except json.JSONDecodeError as exc:
        raise RowSkip(reason, f"field '{name}' is not valid JSON ({exc.msg} at column {exc.colno})") from None
