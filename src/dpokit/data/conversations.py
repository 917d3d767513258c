"""The chat layouts' messages: each one checked, and a conversation split into the shared context
and the two replies (the rules are in `data/pairs.py`'s docstring, under `conversational`)."""

from __future__ import annotations

from typing import Any

from dpokit.data.sources import Row, RowSkip, value_type

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "system": "system",
                  "tool": "tool"}
# Roles chat templates render; any other (a typo such as `usr`) would be rendered as if valid, or dropped.
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
AGENT_ROLES = ("assistant", "tool")  # the messages of one assistant turn
MESSAGE_KEYS = ("tool_calls", "tool_call_id", "name", "reasoning_content")  # kept beside role, content

Message = dict[str, Any]


def chat_messages(row: Row, name: str) -> list[Message]:
    """Field `name` of a conversational row: a non-empty list of checked `{role, content}` messages."""
    value = row[name]
    if not isinstance(value, list) or not value:
        raise RowSkip("malformed_messages", f"field '{name}' must be a non-empty list of messages, got {value_type(value)}")
    return [_message(message, name, i) for i, message in enumerate(value)]


def _message(message: Any, name: str, i: int) -> Message:
    """One `{role, content}` message, keeping the tool-calling keys a chat template renders
    (`tool_calls`, `tool_call_id`, `name`, `reasoning_content`); a message holding `tool_calls`
    may have no content. Keys a hub dataset fills with null are dropped."""
    role = message.get("role") if isinstance(message, dict) else None
    content = message.get("content") if isinstance(message, dict) else None
    calls = message.get("tool_calls") if isinstance(message, dict) else None
    if not isinstance(role, str) or not (isinstance(content, str) or (content is None and calls)):
        raise RowSkip("malformed_messages", f"field '{name}', message {i}: expected {{role, content}} strings")
    if role not in CHAT_ROLES:
        raise RowSkip("unknown_role", f"field '{name}', message {i}: role '{role}' is not one a chat "
                                      f"template knows ({', '.join(CHAT_ROLES)})")
    if calls is not None and not (isinstance(calls, list) and all(isinstance(c, dict) for c in calls)):
        raise RowSkip("malformed_messages", f"field '{name}', message {i}: 'tool_calls' must be a list of objects")
    out = {"role": role, "content": content}
    out.update({key: message[key] for key in MESSAGE_KEYS if message.get(key) is not None})
    return out


def sharegpt_messages(row: Row, name: str) -> list[Message]:
    """Field `name` of a sharegpt row (one `{from, value}` message or a list) as `{role, content}` messages."""
    value = row[name]
    items = [value] if isinstance(value, dict) else value
    if not isinstance(items, list) or not items:
        raise RowSkip("malformed_messages", f"field '{name}' must be a message or a list of them, got {value_type(value)}")
    out = []
    for i, message in enumerate(items):
        role = SHAREGPT_ROLES.get(message.get("from")) if isinstance(message, dict) else None
        if role is None or not isinstance(message.get("value"), str):
            raise RowSkip("malformed_messages", f"field '{name}', message {i}: expected {{from, value}} with from "
                                                f"in {', '.join(sorted(SHAREGPT_ROLES))}")
        out.append({"role": role, "content": message["value"]})
    return out


def split_conversations(prompt, chosen, rejected, all_turns: bool = False):
    """Explicit prompt and/or whole conversations -> (context, chosen reply, rejected reply)."""
    if prompt is not None and _is_completion(chosen, prompt) and _is_completion(rejected, prompt):
        # TRL's explicit-prompt layout: each completion continues the prompt as given, later user
        # turns included (masked out of the loss by the tokenizer), in either --train-on-turns mode.
        return _check_context(prompt, None, _ends_with_assistant(chosen, "chosen"),
                              _ends_with_assistant(rejected, "rejected"))
    if all_turns and not _is_reply(chosen) and not _is_reply(rejected):
        return _check_context(prompt, *_split_at_divergence(chosen, rejected))
    context_c, reply_c = _split_last_assistant(chosen, "chosen")
    context_r, reply_r = _split_last_assistant(rejected, "rejected")
    if context_c is not None and context_r is not None and context_c != context_r:
        raise RowSkip("prompt_mismatch", "chosen and rejected conversations differ before the last assistant turn")
    context = context_c if context_c is not None else context_r
    return _check_context(prompt, context, reply_c, reply_r)


def _check_context(prompt, context, reply_c, reply_r):
    if context is None:
        context = prompt
    elif prompt is not None and context[len(context) - len(prompt):] != prompt:
        raise RowSkip("prompt_mismatch", "the conversation in 'chosen' does not end with the row's 'prompt'")
    if not context:
        raise RowSkip("no_prompt", "no prompt: neither a 'prompt' field nor a user turn before the reply")
    return context, reply_c, reply_r


def _split_at_divergence(chosen: list[Message], rejected: list[Message]):
    """`--train-on-turns all`: (shared turns, chosen from the assistant turn where the two first
    differ, rejected likewise). Each response may hold later user turns (masked out of the loss
    by the tokenizer) and must end with an assistant message."""
    same = 0
    while same < min(len(chosen), len(rejected)) and chosen[same] == rejected[same]:
        same += 1
    start = same
    while start and chosen[start - 1]["role"] in AGENT_ROLES:
        start -= 1  # back to the start of the assistant turn the first difference is in
    for name, messages in (("chosen", chosen), ("rejected", rejected)):
        if same < len(messages) and messages[same]["role"] not in AGENT_ROLES:
            raise RowSkip("prompt_mismatch", f"chosen and rejected differ first in a {messages[same]['role']} "
                                             f"message (message {same}), not in an assistant turn")
        if start >= len(messages) or messages[start]["role"] != "assistant" or messages[-1]["role"] != "assistant":
            raise RowSkip("no_assistant_turn", f"field '{name}' does not end with an assistant message after "
                                               "the turns it shares")
    return chosen[:start], chosen[start:], rejected[start:]


def _is_completion(messages: list[Message], prompt: list[Message]) -> bool:
    """A continuation of the row's prompt: starts with the assistant (it may hold later user turns)
    and does not repeat the prompt (a whole conversation holds it, and is split as one)."""
    size = len(prompt)
    return messages[0]["role"] == "assistant" and not any(
        messages[i:i + size] == prompt for i in range(len(messages) - size + 1))


def _ends_with_assistant(messages: list[Message], name: str) -> list[Message]:
    """A response whose last message is the assistant's: a response ending in a tool result or a
    user turn would end with tokens the model never writes (its final EOS closing their turn)."""
    if messages[-1]["role"] != "assistant":
        raise RowSkip("no_assistant_turn", f"field '{name}' ends with a {messages[-1]['role']} message, "
                                           "not the assistant's")
    return messages


def _is_reply(messages: list[Message]) -> bool:
    """A reply alone (not a whole conversation): starts with the assistant, holds no user turn."""
    return messages[0]["role"] == "assistant" and all(m["role"] in AGENT_ROLES for m in messages)


def _split_last_assistant(messages: list[Message], name: str):
    """(context, last assistant turn), or (None, messages) for a reply alone. An assistant turn is
    the assistant's messages after the last user (or system) message, with the tool results it
    called for: an agent's trajectory is one turn, a response spanning several messages."""
    if _is_reply(messages):
        return None, _ends_with_assistant(messages, name)
    start = len(messages)
    while start and messages[start - 1]["role"] in AGENT_ROLES:
        start -= 1
    while start < len(messages) and messages[start]["role"] != "assistant":
        start += 1  # tool results before the turn's first assistant message belong to the context
    if start == len(messages):
        raise RowSkip("no_assistant_turn", f"field '{name}' holds no assistant message after its last user turn")
    return messages[:start], _ends_with_assistant(messages[start:], name)
