"""Rule 0 of `data/tokenize.py`: a canonical pair -> the texts that are tokenized.

Text pairs are used as written; conversational pairs go through the tokenizer's chat template
(or `--chat-template FILE`), with the row's tools and template arguments (`data/templates.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path

from dpokit.data.pairs import PreferencePair, first_difference
from dpokit.data.sources import RowSkip
from dpokit.data.templates import has_tool_calls, row_template_kwargs, row_tools, without_tool_calls
from dpokit.data.turns import Render
from dpokit.errors import DpokitError, first_line


class PairRenderer:
    """Renders pairs and prompts with one tokenizer's chat template and one set of template arguments."""

    def __init__(self, tokenizer, template_kwargs: dict | None = None):
        self.tokenizer = tokenizer
        self.template_kwargs = dict(template_kwargs or {})  # passed to every chat template call

    def render(self, pair: PreferencePair) -> tuple[str, str, str]:
        """(prompt, chosen, rejected) texts whose concatenations are the full rendered sequences."""
        if not pair.is_chat:
            if row_tools(pair) is not None:  # text is used as written: nothing would render them
                raise RowSkip("tools_unsupported", "the row has 'tools' but its text layout uses no chat template")
            return pair.prompt, pair.chosen, pair.rejected  # type: ignore[return-value]
        tools, kwargs = row_tools(pair), row_template_kwargs(pair, self.template_kwargs)
        prompt = self._apply_template(pair.prompt, True, tools, kwargs)
        texts = [prompt]
        for name, reply, finished in (("chosen", pair.chosen, pair.chosen_finished),
                                      ("rejected", pair.rejected, pair.rejected_finished)):
            full = self._apply_template([*pair.prompt, *reply], False, tools, kwargs)
            self._check_tools_rendered([*pair.prompt, *reply], full, tools, kwargs, name)
            if not full.startswith(prompt):
                at = first_difference(prompt, full)
                raise RowSkip("template_boundary", f"the chat template renders the prompt differently alone and "
                                                   f"followed by '{name}' (from character {at})")
            texts.append(full[len(prompt):] if finished else _without_turn_end(full[len(prompt):], reply))
        return texts[0], texts[1], texts[2]

    def render_prompt(self, prompt: str | Sequence[dict]) -> str:
        """A prompt's text: as written, or messages through the chat template with its generation prompt."""
        if isinstance(prompt, str):
            return prompt
        return self._apply_template(prompt, True, None, self.template_kwargs)

    def turn_renderer(self, pair: PreferencePair) -> Render:
        """The chat template as `data/turns.py` calls it, with this row's tools and template arguments."""
        tools, kwargs = row_tools(pair), row_template_kwargs(pair, self.template_kwargs)
        return lambda messages, generation: self._apply_template(messages, generation, tools, kwargs)

    def _check_tools_rendered(self, conversation, full: str, tools, kwargs, name: str) -> None:
        """Tools or tool calls a template leaves out would train on a conversation the data does
        not hold: such a template renders the same text without them."""
        if tools is not None and full == self._apply_template(conversation, False, None, kwargs):
            raise RowSkip("tools_unsupported", "the chat template does not render the row's 'tools'")
        if has_tool_calls(conversation) and full == self._apply_template(
                without_tool_calls(conversation), False, tools, kwargs):
            raise RowSkip("tools_unsupported", f"the chat template does not render the 'tool_calls' in '{name}'")

    def _apply_template(self, messages, add_generation_prompt: bool, tools=None, kwargs=None) -> str:
        """The template's text. A tool-call message with null content reaches the template without a
        `content` key (transformers drops null keys); a template that cannot do without one (SmolLM2's
        `message['content']`) gets the empty string instead, the text such a message has."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise DpokitError("conversational data needs a chat template, and this tokenizer has none; "
                              "pass --chat-template FILE.jinja")
        call = partial(self.tokenizer.apply_chat_template, tokenize=False,
                       add_generation_prompt=add_generation_prompt, tools=tools, **(kwargs or {}))
        try:
            return call(list(messages))
        except Exception as exc:  # noqa: BLE001 - jinja raises its own types, templates raise_exception
            failure = exc
        if any(message.get("content", "") is None for message in messages):
            try:
                return call([{**m, "content": "" if m.get("content") is None else m["content"]} for m in messages])
            except Exception as exc:  # noqa: BLE001 - as above
                failure = exc
        raise RowSkip("template_error", f"the chat template failed: {first_line(failure)}") from None


def _without_turn_end(response: str, reply: Sequence[dict]) -> str:
    """A cut-off reply's rendering up to the end of its last message's text: whatever the template
    writes after it (`<|im_end|>\\n`, Gemma's `<end_of_turn>`) closes a turn the model never closed."""
    content = reply[-1].get("content") or ""
    for text in (content, content.strip()):  # templates that trim the message render it stripped
        end = response.rfind(text) if text else -1
        if end >= 0:
            return response[:end + len(text)]
    return response  # the text is not found as written: tokenization still drops a final EOS


def read_chat_template(path: str) -> str:
    """The text of a `--chat-template` file (a Jinja template)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise DpokitError(f"--chat-template {path} does not exist")
    try:
        return file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DpokitError(f"--chat-template {path}: cannot read it ({exc})") from None
