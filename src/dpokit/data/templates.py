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

from dpokit.data.pairs import PreferencePair
from dpokit.data.sources import RowSkip
from dpokit.errors import DpokitError

TOOLS_COLUMN = "tools"
KWARGS_COLUMN = "chat_template_kwargs"
_RESERVED = ("messages", "conversation", "tools", "documents", "add_generation_prompt", "tokenize",
             "continue_final_message", "return_dict", "chat_template")


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
    reserved = sorted(set(value) & set(_RESERVED))
    if reserved:
        raise DpokitError(f"--chat-template-kwargs: {', '.join(reserved)} is set by dpokit itself, not a template argument")
    return value


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
