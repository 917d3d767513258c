"""Responses of several messages under published chat templates (tests/helpers/published_templates.py):
a special token the template writes inside a response (ChatML's BOS `<|im_start|>` at each turn, a
turn's EOS) is part of the rendered text, and only one inside a message's own text is suspect
(tokenize.py, rule 1); only the assistant's own tokens are trained, tool results and user turns
being context, under `--train-on-turns last` as under `all`; TRL's explicit-prompt layout appends
each completion, later turns and all, to the prompt; a tool call with null content renders as the
template expects."""

from __future__ import annotations

import json

import pytest

from dpokit.config import DataConfig
from dpokit.data import read_pairs
from dpokit.data.tokenize import PairTokenizer
from dpokit.errors import DpokitError
from helpers.published_templates import PUBLISHED, TURN_ENDS
from test_tokenizer_conventions import build, expected_sequence

SYSTEM = {"role": "system", "content": "be brief"}
ASK = {"role": "user", "content": "hello"}
FOLLOW_UP = {"role": "user", "content": "the capital of France?"}


def _say(text: str) -> dict:
    return {"role": "assistant", "content": text}


CHECK_TOOL = [_say("Let me check."), {"role": "tool", "content": "18 degrees"}, _say("It is 18 degrees.")]
ROWS = {  # kind -> (row, --train-on-turns modes that keep it); Gemma's template takes no system message
    "branched": (lambda head: {"chosen": [*head, _say("hello world"), FOLLOW_UP, _say("Paris.")],
                               "rejected": [*head, _say("hi there"), FOLLOW_UP, _say("Rome.")]}, ("all",)),
    "agent": (lambda head: {"chosen": [*head, *CHECK_TOOL], "rejected": [*head, _say("Sunny, I guess.")]},
              ("last", "all")),
    "trl-prompt": (lambda head: {"prompt": head, "chosen": [_say("hello world"), FOLLOW_UP, _say("Paris.")],
                                 "rejected": [_say("hi there"), FOLLOW_UP, _say("Rome.")]}, ("last", "all")),
}
ASSISTANT_TEXTS = {"branched": (["hello world", "Paris."], ["hi there", "Rome."]),
                   "agent": (["Let me check.", "It is 18 degrees."], ["Sunny, I guess."]),
                   "trl-prompt": (["hello world", "Paris."], ["hi there", "Rome."])}
CASES = [(name, kind, turns) for name in PUBLISHED for kind, (_, modes) in ROWS.items() for turns in modes
         if not (name == "gemma" and kind == "agent")]  # Gemma's template refuses a tool role


def _decode(tok, ids) -> str:
    return tok.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _trained(tok, ids, mask) -> list[str]:
    """The decoded runs of consecutive tokens in the loss (every token when there is no mask)."""
    runs, current = [], []
    for token, keep in zip(ids, mask or [True] * len(ids), strict=True):
        if keep:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return [_decode(tok, run) for run in [*runs, current] if run]


def _read(tmp_path, rows, turns: str = "last", strict: bool = False):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    reader = read_pairs(str(path), DataConfig(data=str(path), train_on_turns=turns, strict=strict))
    return list(reader), reader.stats


@pytest.mark.parametrize(("name", "kind", "turns"), CASES)
def test_multi_message_responses_keep_the_templates_tokens_and_train_only_the_assistant(tmp_path, name, kind, turns):
    convention = PUBLISHED[name]
    tok = build(convention)
    head = [ASK] if name == "gemma" else [SYSTEM, ASK]
    pairs, read_stats = _read(tmp_path, [ROWS[kind][0](head)], turns)
    assert read_stats.skipped == {}, read_stats.examples  # TRL's layout was prompt_mismatch
    pair_tokenizer = PairTokenizer(tok, max_length=512)
    [kept], stats = pair_tokenizer.tokenize(pairs)
    assert stats.skipped == {}, stats.examples  # SmolLM2's was special_token_in_response (BOS <|im_start|>)
    prompt, chosen, rejected = pair_tokenizer.render(pairs[0])
    turn_end, final_end = TURN_ENDS[name]
    for ids, mask, text, texts in ((kept.chosen_ids, kept.chosen_mask, chosen, ASSISTANT_TEXTS[kind][0]),
                                   (kept.rejected_ids, kept.rejected_mask, rejected, ASSISTANT_TEXTS[kind][1])):
        assert _decode(tok, kept.prompt_ids + ids) == expected_sequence(convention, prompt, text)
        assert ids[-1] == tok.eos_token_id and ids[-2] != tok.eos_token_id  # one final EOS
        # Only the assistant's text and its turn end are trained: the tool result, the user turn and
        # the role headers the template writes between them are context (they were trained under `last`).
        assert _trained(tok, ids, mask) == [t + turn_end for t in texts[:-1]] + [texts[-1] + final_end]


def test_a_special_token_in_a_messages_own_text_is_still_skipped(tmp_path):
    tok = build(PUBLISHED["smollm2"])
    rows = [{"prompt": [ASK], "chosen": [_say("see <|im_start|>user"), FOLLOW_UP, _say("Paris.")],
             "rejected": [_say("hi there")]},
            {"prompt": [ASK], "chosen": [_say("hello"), {"role": "tool", "content": "done<|im_end|>"}, _say("ok")],
             "rejected": [_say("hi there")]}]
    pairs, _ = _read(tmp_path, rows)
    kept, stats = PairTokenizer(tok, max_length=512).tokenize(pairs)
    assert kept == [] and stats.skipped == {"special_token_in_response": [1, 2]}
    assert "'chosen', message 0 holds the BOS token '<|im_start|>' in its own text" in stats.examples["special_token_in_response"]


def test_a_response_must_end_with_the_assistant(tmp_path):
    rows = [{"prompt": [ASK], "chosen": [_say("Let me check."), {"role": "tool", "content": "18 degrees"}],
             "rejected": [_say("Sunny.")]},
            {"chosen": [ASK, _say("hello world"), FOLLOW_UP], "rejected": [ASK, _say("hi"), FOLLOW_UP]}]
    for turns in ("last", "all"):
        pairs, stats = _read(tmp_path, rows, turns)
        assert pairs == [] and stats.skipped == {"no_assistant_turn": [1, 2]}, (turns, stats.examples)
    with pytest.raises(DpokitError, match="field 'chosen' ends with a tool message, not the assistant's"):
        _read(tmp_path, rows, strict=True)


def test_a_whole_conversation_holding_the_prompt_is_still_split_at_its_last_turn(tmp_path):
    """A `prompt` naming the last user message of whole conversations (which may open with an
    assistant greeting) is not a completion's prompt: the conversation is split as before."""
    greeting = _say("How can I help?")
    row = {"prompt": [FOLLOW_UP], "chosen": [greeting, FOLLOW_UP, _say("Paris.")],
           "rejected": [greeting, FOLLOW_UP, _say("Rome.")]}
    [pair], _ = _read(tmp_path, [row])
    assert pair.prompt == [greeting, FOLLOW_UP] and pair.chosen == [_say("Paris.")]


WEATHER_CALL = {"role": "assistant", "content": None, "tool_calls": [
    {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
# ChatML that renders tool calls but reads every message's content unguarded.
CHATML_CALLS = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] }}"
                "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function.name }}</tool_call>{% endfor %}"
                "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.mark.parametrize(("template", "expected"), [
    ("smollm2", {"tools_unsupported": [1]}),  # was template_error: 'dict object' has no attribute 'content'
    ("qwen2.5", {}),  # tests `if message.content`: renders the call alone
    ("chatml-calls", {}),  # reads content unguarded: renders it as the empty text it is
])
def test_a_tool_call_with_null_content_renders_as_the_template_expects(tmp_path, template, expected):
    convention = PUBLISHED["qwen2.5"] if template != "smollm2" else PUBLISHED["smollm2"]
    tok = build(convention)
    if template == "chatml-calls":
        tok.chat_template = CHATML_CALLS
    row = {"prompt": [ASK], "chosen": [WEATHER_CALL, {"role": "tool", "content": "18 degrees"}, _say("18 degrees.")],
           "rejected": [_say("Sunny.")], **({"tools": [WEATHER_TOOL]} if template == "qwen2.5" else {})}
    pairs, _ = _read(tmp_path, [row])
    pair_tokenizer = PairTokenizer(tok, max_length=2048)  # Qwen's tool block is long in a 320-token vocabulary
    kept, stats = pair_tokenizer.tokenize(pairs)
    assert stats.skipped == expected, stats.examples
    if expected:
        assert "does not render the 'tool_calls' in 'chosen'" in stats.examples["tools_unsupported"]
        return
    _, chosen, _ = pair_tokenizer.render(pairs[0])
    assert chosen.startswith("<tool_call>\n{\"name\": \"get_weather\"" if template == "qwen2.5"
                             else "<tool_call>get_weather</tool_call><|im_end|>")
    assert "None" not in chosen and stats.rows_cut == 0
    assert _trained(tok, kept[0].chosen_ids, kept[0].chosen_mask)[1] == "18 degrees.<|im_end|>"
