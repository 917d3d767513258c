"""Conversations as users have them: multi-turn responses under templates that close every turn
with EOS, tool definitions and calls, and extra template arguments (tokenize.py rules 0 and 1,
data/templates.py). Rows are shaped as the public formats document them: OpenAI-style
`tool_calls` ({type, function: {name, arguments}}), `tool` messages, TRL's per-row `tools` column
of JSON schemas, Qwen3's `enable_thinking`."""

from __future__ import annotations

import dataclasses
import gzip
import json

import pytest

from dpokit.config import DataConfig, validate_data
from dpokit.data import read_pairs
from dpokit.data.pairs import PreferencePair
from dpokit.data.templates import parse_template_kwargs
from dpokit.data.tokenize import PairTokenizer
from dpokit.errors import DpokitError
from test_tokenizer_conventions import CONVENTIONS, Convention, build, expected_sequence

# Llama 3: BOS written by the template on top of a tokenizer that adds it; every turn ends with <|eot_id|>,
# the instruct tokenizer's EOS, with nothing after it.
LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
# ChatML with tools and a thinking switch, after Qwen's documented layout: tool schemas in a system
# block, calls as <tool_call> JSON, results as <tool_response> in a user turn, and with
# enable_thinking=false an empty <think></think> after the generation prompt and before each reply.
QWEN_TOOLS = (
    "{% if tools %}<|im_start|>system\n# Tools\n<tools>{% for t in tools %}\n{{ t | tojson }}{% endfor %}\n</tools>"
    "<|im_end|>\n{% endif %}"
    "{% set think = '<think>\n\n</think>\n\n' if enable_thinking is defined and not enable_thinking else '' %}"
    "{% for m in messages %}"
    "{% if m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>\n"
    "{% elif m.role == 'assistant' %}<|im_start|>assistant\n{{ think }}{{ m.content or '' }}"
    "{% for c in m.tool_calls or [] %}<tool_call>\n{\"name\": \"{{ c.function.name }}\", \"arguments\": "
    "{{ c.function.arguments | tojson }}}\n</tool_call>{% endfor %}<|im_end|>\n"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{{ think }}{% endif %}"
)
TEMPLATES = {
    "chatml-instruct": CONVENTIONS["qwen2.5-instruct"],  # EOS <|im_end|> after every turn
    "llama3": Convention("<|begin_of_text|>", "<|eot_id|>", adds_bos=True,
                         extra=("<|start_header_id|>", "<|end_header_id|>"), template=LLAMA3),
    "gemma": CONVENTIONS["gemma"],  # turns end with <end_of_turn>; EOS only after the response
    "qwen-tools": Convention(None, "<|im_end|>", adds_bos=False, pad="<|endoftext|>", extra=("<|im_start|>",),
                             template=QWEN_TOOLS),
}
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
USER = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "What is the weather in Paris?"}]
CALL = {"role": "assistant", "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
AGENT_TURN = [CALL, {"role": "tool", "name": "get_weather", "content": "{\"temperature\": 18}"},
              {"role": "assistant", "content": "18 degrees in Paris."}]
GUESS = [{"role": "assistant", "content": "It is sunny, I think."}]


def _decode(tok, ids) -> str:
    return tok.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _tokenize(name: str, pairs, **options):
    convention = TEMPLATES[name]
    tok = build(convention)
    pair_tokenizer = PairTokenizer(tok, max_length=512, **options)
    kept, stats = pair_tokenizer.tokenize(pairs)
    return convention, tok, pair_tokenizer, kept, stats


def _multi_turn_pairs() -> list[PreferencePair]:
    """A response of three messages (call, tool result, answer) and one of several assistant messages."""
    plain_agent = [{"role": "assistant", "content": "Let me check."}, {"role": "tool", "content": "18 degrees"},
                   {"role": "assistant", "content": "18 degrees in Paris."}]
    two_replies = [{"role": "assistant", "content": "hello"}, {"role": "assistant", "content": "Paris."}]
    return [PreferencePair(USER, plain_agent, GUESS, 1), PreferencePair(USER[1:], two_replies, GUESS, 2)]


@pytest.mark.parametrize("name", ["chatml-instruct", "llama3", "gemma"])
def test_multi_turn_response_keeps_the_templates_turn_ends_and_one_final_eos(name):
    convention, tok, pair_tokenizer, kept, stats = _tokenize(name, _multi_turn_pairs())
    assert stats.skipped == {} and len(kept) == 2, stats.examples  # was special_token_in_response
    for pair, tokenized in zip(_multi_turn_pairs(), kept, strict=True):
        prompt, chosen, _ = pair_tokenizer.render(pair)
        ids = tokenized.chosen_ids
        assert _decode(tok, tokenized.prompt_ids + ids) == expected_sequence(convention, prompt, chosen)
        assert ids[-1] == tok.eos_token_id and ids[-2] != tok.eos_token_id  # exactly one final EOS
        inner = list(ids[:-1]).count(tok.eos_token_id)
        # ChatML/Llama 3 close each of the response's messages with EOS; Gemma closes turns with its own token.
        assert inner == (0 if name == "gemma" else len(pair.chosen) - 1), (name, pair.index)


def test_a_literal_eos_in_a_message_is_still_skipped():
    eos = TEMPLATES["chatml-instruct"].eos
    scraped = [{"role": "assistant", "content": "hello"}, {"role": "assistant", "content": f"Paris.{eos} more"}]
    _, _, _, kept, stats = _tokenize("chatml-instruct", [PreferencePair(USER, scraped, GUESS, 4)])
    assert kept == [] and stats.skipped == {"special_token_in_response": [4]}


def test_a_whole_agent_conversation_splits_before_the_agents_turn(tmp_path):
    """Chosen and rejected as whole conversations differing inside the agent's turn (tool call vs
    guess): the prompt is the conversation up to the last user message, the response the turn."""
    path = tmp_path / "agent.jsonl"
    rows = [{"chosen": [*USER, *AGENT_TURN], "rejected": [*USER, *GUESS], "tools": [WEATHER_TOOL]},
            {"chosen": [*USER, *AGENT_TURN, {"role": "user", "content": "thanks"}], "rejected": [*USER, *GUESS]}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    reader = read_pairs(str(path))
    pairs = list(reader)
    assert [p.index for p in pairs] == [1] and reader.stats.skipped == {"no_assistant_turn": [2]}
    assert pairs[0].prompt == USER and pairs[0].chosen == AGENT_TURN and pairs[0].rejected == GUESS
    assert pairs[0].extra["tools"] == [WEATHER_TOOL]


@pytest.mark.parametrize("tools", [[WEATHER_TOOL], json.dumps([WEATHER_TOOL])])
def test_tools_and_tool_calls_are_rendered_by_the_template(tools):
    pair = PreferencePair(USER, AGENT_TURN, GUESS, 1, extra={"tools": tools})
    convention, tok, pair_tokenizer, kept, stats = _tokenize("qwen-tools", [pair])
    assert stats.skipped == {} and len(kept) == 1, stats.examples
    prompt, chosen, _ = pair_tokenizer.render(pair)
    assert prompt.startswith("<|im_start|>system\n# Tools\n<tools>" + json.dumps(WEATHER_TOOL))  # Jinja trims
    # the newline after a block tag (transformers' trim_blocks)
    assert prompt.endswith("<|im_start|>assistant\n") and chosen.startswith('<tool_call>\n{"name": "get_weather", "arguments": '
                             '{"city": "Paris"}}\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>')
    sequence = _decode(tok, kept[0].prompt_ids + kept[0].chosen_ids)
    assert sequence == expected_sequence(convention, prompt, chosen)


def test_a_template_that_cannot_render_tools_skips_the_row_with_a_reason():
    rows = [PreferencePair(USER, GUESS, [{"role": "assistant", "content": "no idea"}], 1,
                           extra={"tools": [WEATHER_TOOL]}),
            PreferencePair(USER, AGENT_TURN, GUESS, 2),  # tool_calls the plain ChatML template drops
            PreferencePair(USER, GUESS, [{"role": "assistant", "content": "no idea"}], 3, extra={"tools": "[{"}),
            PreferencePair(USER, GUESS, [{"role": "assistant", "content": "no idea"}], 4),
            PreferencePair("What is the weather in Paris?", " Sunny.", " Rainy.", 5, extra={"tools": [WEATHER_TOOL]})]
    _, _, _, kept, stats = _tokenize("chatml-instruct", rows)
    assert [k.index for k in kept] == [4]
    assert stats.skipped == {"tools_unsupported": [1, 2, 5], "malformed_tools": [3]}
    assert "does not render the row's 'tools'" in stats.examples["tools_unsupported"]


def test_template_kwargs_from_the_flag_and_the_row():
    rows = [PreferencePair(USER, GUESS, [{"role": "assistant", "content": "no idea"}], i, extra=extra)
            for i, extra in enumerate([{}, {"chat_template_kwargs": {"enable_thinking": True}},
                                       {"chat_template_kwargs": '{"enable_thinking": true}'}], start=1)]
    thinking_off = parse_template_kwargs('{"enable_thinking": false}')
    _, tok, _, kept, stats = _tokenize("qwen-tools", rows, template_kwargs=thinking_off)
    assert stats.skipped == {} and len(kept) == 3
    prompts = [_decode(tok, k.prompt_ids) for k in kept]
    assert prompts[0].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # the flag
    assert prompts[1] == prompts[2] and prompts[1].endswith("<|im_start|>assistant\n")  # the row overrides it
    _, _, _, default, _ = _tokenize("qwen-tools", rows[:1])
    assert _decode(tok, default[0].prompt_ids) == prompts[1]


@pytest.mark.parametrize("value, message", [
    ("{bad", r"^--chat-template-kwargs: not valid JSON"),
    ("[1]", r"^--chat-template-kwargs: expected a JSON object"),
    ('{"tools": []}', r"^--chat-template-kwargs: tools is set by dpokit itself"),
])
def test_bad_template_kwargs_are_one_line(value, message):
    with pytest.raises(DpokitError, match=message):
        validate_data(DataConfig(data="x.jsonl", chat_template_kwargs=value))



def test_the_doctor_reports_turns_tools_and_template_kwargs(tmp_path):
    from dpokit.data.doctor import format_report, inspect_data

    path = tmp_path / "chat.jsonl"
    rows = [{"prompt": USER, "chosen": AGENT_TURN, "rejected": GUESS, "tools": [WEATHER_TOOL]},
            {"chosen": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hello world"},
                        {"role": "user", "content": "the capital of France?"}, {"role": "assistant", "content": "Paris."}],
             "rejected": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hello world"},
                          {"role": "user", "content": "the capital of France?"}, {"role": "assistant", "content": "Rome."}],
             "chat_template_kwargs": {"enable_thinking": True}}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    data = DataConfig(data=str(path), chat_template_kwargs='{"enable_thinking": false}')
    tok = build(TEMPLATES["qwen-tools"])
    report = inspect_data(str(path), data, tok)
    assert report["rows_kept"] == 2 and report["skipped"] == {}
    chat = report["conversations"]
    assert (chat["assistant_turns"]["min"], chat["assistant_turns"]["max"]) == (1, 2)
    assert (chat["response_messages"]["min"], chat["response_messages"]["max"]) == (1, 3)
    assert (chat["rows_with_tools"], chat["rows_with_tool_calls"], chat["rows_with_template_kwargs"]) == (1, 1, 1)
    assert chat["template_kwargs"] == {"enable_thinking": False} and chat["train_on_turns"] == "last"
    assert "conversations: 1.5 assistant turns on average (max 2), 1 rows with tools" in format_report(report)
    text_file = tmp_path / "text.jsonl"
    text_file.write_text(json.dumps({"prompt": "a", "chosen": " b", "rejected": " c"}) + "\n")
    assert inspect_data(str(text_file), DataConfig(data=str(text_file)))["conversations"] is None


MULTI_TURN = {  # two branches sharing the first user turn, differing from the first assistant turn on
    "chosen": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hello world"},
               {"role": "user", "content": "the capital of France?"}, {"role": "assistant", "content": "Paris."}],
    "rejected": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "be brief"},
                 {"role": "user", "content": "the capital of France?"}, {"role": "assistant", "content": "Rome."}],
}
TURN_ENDS = {"chatml-instruct": ("<|im_end|>", "<|im_end|>"), "llama3": ("<|eot_id|>", "<|eot_id|>"),
             "gemma": ("<end_of_turn>\n", "<end_of_turn>\n<eos>")}


def _segments(tok, ids, mask, trained=True) -> list[str]:
    """The decoded runs of consecutive tokens whose mask is `trained`."""
    runs, current = [], []
    for token, m in zip(ids, mask, strict=True):
        if m == trained:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return [_decode(tok, run) for run in [*runs, current] if run]


def _turn_pairs(tmp_path, turns: str):
    path = tmp_path / "multi.jsonl"
    path.write_text(json.dumps(MULTI_TURN) + "\n")
    reader = read_pairs(str(path), DataConfig(data=str(path), train_on_turns=turns))
    return list(reader), reader.stats


@pytest.mark.parametrize("name", ["chatml-instruct", "llama3", "gemma"])
def test_train_on_all_turns_masks_exactly_the_assistant_tokens(tmp_path, name):
    pairs, _ = _turn_pairs(tmp_path, "all")
    assert pairs[0].prompt == MULTI_TURN["chosen"][:1] and pairs[0].chosen == MULTI_TURN["chosen"][1:]
    convention, tok, pair_tokenizer, [kept], stats = _tokenize(name, pairs)
    assert stats.skipped == {}
    first, last = TURN_ENDS[name]
    for ids, mask, (one, two) in ((kept.chosen_ids, kept.chosen_mask, ("hello world", "Paris.")),
                                  (kept.rejected_ids, kept.rejected_mask, ("be brief", "Rome."))):
        assert len(mask) == len(ids)
        assert _segments(tok, ids, mask) == [one + first, two + last]  # the assistant's tokens, turn ends included
        [between] = _segments(tok, ids, mask, trained=False)
        assert "the capital of France?" in between and one not in between  # the user turn and headers: context
    prompt, chosen, _ = pair_tokenizer.render(pairs[0])
    assert _decode(tok, kept.prompt_ids + kept.chosen_ids) == expected_sequence(convention, prompt, chosen)


@pytest.mark.parametrize("name", ["chatml-instruct", "llama3", "gemma"])
def test_a_cut_off_last_turn_is_trained_without_its_turn_end(tmp_path, name):
    pairs, _ = _turn_pairs(tmp_path, "all")
    cut = [dataclasses.replace(pairs[0], chosen_finished=False)]
    _, tok, _, [kept], stats = _tokenize(name, cut)
    first, last = TURN_ENDS[name]
    assert stats.skipped == {} and len(kept.chosen_mask) == len(kept.chosen_ids)
    # The earlier turn keeps the end the template wrote; the cut one stops at its text, no EOS.
    assert _segments(tok, kept.chosen_ids, kept.chosen_mask) == ["hello world" + first, "Paris."]
    assert _segments(tok, kept.rejected_ids, kept.rejected_mask)[-1] == "Rome." + last


def test_train_on_the_last_turn_keeps_todays_rule(tmp_path):
    pairs, stats = _turn_pairs(tmp_path, "last")
    assert pairs == [] and stats.skipped == {"prompt_mismatch": [1]}  # the branches differ before the last turn
    _, _, _, [kept], _ = _tokenize("chatml-instruct", [PreferencePair(USER, GUESS, AGENT_TURN[2:], 1)])
    assert kept.chosen_mask is None  # a single assistant message: every token trained, as before


@pytest.mark.parametrize("layout", ["padded", "packed", "prefix-shared"])
def test_masked_turns_score_only_the_assistant_tokens_in_every_layout(tmp_path, layout):
    import torch

    from dpokit.data.batching import collate
    from dpokit.model.logprobs import sequence_logps
    from helpers.toy import build_tiny_llama

    pairs, _ = _turn_pairs(tmp_path, "all")
    _, tok, _, [kept], _ = _tokenize("chatml-instruct", pairs)
    model = build_tiny_llama(tok, seed=3).eval()
    with torch.no_grad():
        out = sequence_logps(model, collate([kept], tok.pad_token_id, layout))
    for ids, mask, logps, count in ((kept.chosen_ids, kept.chosen_mask, out.chosen_logps, out.chosen_lengths),
                                    (kept.rejected_ids, kept.rejected_mask, out.rejected_logps, out.rejected_lengths)):
        sequence = torch.tensor([list(kept.prompt_ids + ids)])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=sequence).logits.double(), dim=-1)[0]
        p = len(kept.prompt_ids)
        naive = sum(logp[p + k - 1, ids[k]].item() for k in range(len(ids)) if mask[k])
        assert count.item() == sum(mask) < len(ids)
        assert abs(logps.item() - naive) < 1e-4  # float32 forward vs float64 reference sum of ~20 terms


def test_truncation_cuts_the_masks_with_the_responses(tmp_path):
    pairs, _ = _turn_pairs(tmp_path, "all")
    _, tok, _, [full], _ = _tokenize("chatml-instruct", pairs)
    limit = len(full.prompt_ids) + 6
    [cut], stats = PairTokenizer(tok, max_length=limit).tokenize(pairs)
    assert stats.responses_cut == 1 and len(cut.chosen_mask) == len(cut.chosen_ids) == 6
    assert cut.chosen_mask == full.chosen_mask[:6]


@pytest.mark.slow
def test_train_end_to_end_on_agent_turns_all_turns_and_template_kwargs(tmp_path, capsys):
    """The CLI path: flags reach the tokenizer, masked multi-turn pairs and tool rows train."""
    from dpokit import cli
    from helpers.toy import build_tiny_llama

    tok = build(TEMPLATES["qwen-tools"])
    model_dir = tmp_path / "model"
    build_tiny_llama(tok, seed=0).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    rows = [MULTI_TURN, {"chosen": [*USER, *AGENT_TURN], "rejected": [*USER, *GUESS], "tools": [WEATHER_TOOL]}] * 4
    data = tmp_path / "agent.jsonl.gz"
    data.write_bytes(gzip.compress("".join(json.dumps(row) + "\n" for row in rows).encode()))
    code = cli.main(["train", "--model", str(model_dir), "--data", str(data), "--output", str(tmp_path / "run"),
                     "--train-on-turns", "all", "--chat-template-kwargs", '{"enable_thinking": false}',
                     "--max-steps", "2", "--batch-size", "4", "--max-length", "512", "--progress", "off"])
    log = capsys.readouterr().out
    assert code == 0 and "8/8 pairs kept" in log, log


def test_all_turns_skips_branches_that_differ_in_a_user_turn_or_end_without_the_assistant(tmp_path):
    user_differs = json.loads(json.dumps(MULTI_TURN))
    user_differs["rejected"][1] = user_differs["chosen"][1]
    user_differs["rejected"][2] = {"role": "user", "content": "the capital of Italy?"}
    ends_with_user = {"chosen": MULTI_TURN["chosen"][:3], "rejected": MULTI_TURN["rejected"][:3]}
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in (MULTI_TURN, user_differs, ends_with_user)))
    reader = read_pairs(str(path), DataConfig(data=str(path), train_on_turns="all"))
    assert [p.index for p in reader] == [1]
    assert reader.stats.skipped == {"prompt_mismatch": [2], "no_assistant_turn": [3]}
    assert "differ first in a user message (message 2)" in reader.stats.examples["prompt_mismatch"]
