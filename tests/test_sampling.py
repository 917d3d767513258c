"""Sampling: seeded reproducibility, greedy == generate's greedy, EOS, chat templates, prompt files."""

import subprocess
import sys

import pytest
import torch

import dpokit
from dpokit.config import SamplingConfig
from dpokit.errors import DpokitError
from dpokit.eval.sampling import encode_prompt, generate_completions, read_prompts, sample
from helpers.toy import build_tiny_llama, build_tokenizer, make_pairs, write_jsonl

PROMPTS = ["the film was", "my friend", "the music seemed very", "this movie"]


@pytest.fixture(scope="module")
def tok_and_model():
    tokenizer = build_tokenizer("word")
    return tokenizer, build_tiny_llama(tokenizer, seed=3)


def test_reproducible_for_a_seed_and_different_across_seeds(tok_and_model):
    tokenizer, model = tok_and_model
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = sample(model, tokenizer, PROMPTS, num_samples=3, max_new_tokens=8, seed=7, batch_size=5)
    after = torch.rand(1)
    b = sample(model, tokenizer, PROMPTS, num_samples=3, max_new_tokens=8, seed=7, batch_size=5)
    c = sample(model, tokenizer, PROMPTS, num_samples=3, max_new_tokens=8, seed=8, batch_size=5)
    assert a == b
    assert a != c
    assert torch.equal(before, after)  # the caller's RNG stream is left as it was
    assert [len(per_prompt) for per_prompt in a] == [3, 3, 3, 3]
    assert len({text for per_prompt in a for text in per_prompt}) > 6  # samples differ from each other


def test_greedy_equals_generate_greedy_one_prompt_at_a_time(tok_and_model):
    tokenizer, model = tok_and_model
    # Prompts of different lengths in one batch: left padding must not change the result.
    ours = sample(model, tokenizer, PROMPTS, temperature=0, max_new_tokens=6, batch_size=4)
    for prompt, (text,) in zip(PROMPTS, ours, strict=True):
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]  # the tokenizer adds BOS itself
        with torch.no_grad():
            out = model.generate(ids, do_sample=False, max_new_tokens=6, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)
        expected = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        assert text == " " + expected  # the continuation keeps the space that separates it from the prompt


def test_checkpoint_generation_defaults_do_not_leak_into_sampling(tok_and_model):
    tokenizer, model = tok_and_model
    plain = sample(model, tokenizer, PROMPTS, num_samples=2, max_new_tokens=8, seed=1)
    model.generation_config.top_k = 1
    model.generation_config.repetition_penalty = 5.0
    try:
        assert sample(model, tokenizer, PROMPTS, num_samples=2, max_new_tokens=8, seed=1) == plain
    finally:
        model.generation_config.top_k = None
        model.generation_config.repetition_penalty = None


def test_stops_at_eos_and_keeps_it_in_the_ids():
    tokenizer = build_tokenizer("word")
    model = build_tiny_llama(tokenizer, seed=0)
    with torch.no_grad():
        # Make EOS overwhelmingly likely after the first generated token.
        model.lm_head.weight[tokenizer.eos_token_id] = model.lm_head.weight[tokenizer.eos_token_id] * 0 + 5.0
        model.model.norm.weight.fill_(1.0)
    (prompt_index, completions), = list(generate_completions(
        model, tokenizer, ["the film"], SamplingConfig(num_samples=4, max_new_tokens=10, sample_seed=0)))
    assert prompt_index == 0
    for c in completions:
        assert c.finished and c.response_ids[-1] == tokenizer.eos_token_id
        assert tokenizer.eos_token_id not in c.response_ids[:-1]
        assert len(c.response_ids) < 10


def test_chat_template_renders_message_prompts(tok_and_model):
    tokenizer, model = tok_and_model
    with pytest.raises(DpokitError, match="no chat template"):
        encode_prompt(tokenizer, [{"role": "user", "content": "the film"}])
    chat = build_tokenizer("word")
    chat.chat_template = ("{% for m in messages %}{{ m['content'] }} {% endfor %}"
                          "{% if add_generation_prompt %}so{% endif %}")
    messages = [{"role": "user", "content": "the film"}, {"role": "assistant", "content": "was"}]
    ids = encode_prompt(chat, messages)
    assert ids == [chat.bos_token_id] + chat("the film was so", add_special_tokens=False)["input_ids"]
    assert sample(model, chat, [messages], num_samples=2, seed=4, max_new_tokens=8) == sample(
        model, chat, ["the film was so"], num_samples=2, seed=4, max_new_tokens=8)


def test_read_prompts_from_prompt_and_preference_files(tmp_path):
    prefs = write_jsonl(tmp_path / "p.jsonl", make_pairs(5, seed=1))
    assert read_prompts(prefs) == [r["prompt"] for r in make_pairs(5, seed=1)]
    assert len(read_prompts(prefs, limit=2)) == 2
    messages = write_jsonl(tmp_path / "m.jsonl", [{"prompt": [{"role": "user", "content": "hi"}]}])
    assert read_prompts(messages) == [[{"role": "user", "content": "hi"}]]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(DpokitError, match=r"bad.jsonl, line 2: missing field 'prompt'"):
        read_prompts(bad)
    bad.write_text('{"prompt": [{"role": "user"}]}\n')
    with pytest.raises(DpokitError, match="line 1: message 1 must be an object"):
        read_prompts(bad)


def test_sample_is_exported_lazily():
    assert dpokit.sample is sample
    code = "import sys, dpokit; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# A template whose generation prompt depends on an extra argument, as Qwen3's does on enable_thinking.
UPBEAT_TEMPLATE = ("{% for m in messages %}{{ m['content'] }} {% endfor %}"
                   "{% if add_generation_prompt %}{{ 'so' if upbeat is defined and upbeat else 'was' }}{% endif %}")


def test_message_prompts_are_sampled_with_the_runs_chat_template_kwargs(tok_and_model, tmp_path):
    import json

    import yaml

    from dpokit import cli
    from dpokit.data.tokenize import PairTokenizer

    _, model = tok_and_model
    chat = build_tokenizer("word")
    chat.chat_template = UPBEAT_TEMPLATE
    messages = [{"role": "user", "content": "the film"}]
    greedy = SamplingConfig(max_new_tokens=4, temperature=0)
    [(_, [plain])] = generate_completions(model, chat, [messages], greedy)
    [(_, [upbeat])] = generate_completions(model, chat, [messages], greedy, template_kwargs={"upbeat": True})
    [trained_ids] = PairTokenizer(chat, max_length=64, template_kwargs={"upbeat": True}).encode_prompts([messages])
    assert upbeat.prompt_ids == tuple(trained_ids) != plain.prompt_ids  # training's rendering, arguments included
    assert upbeat.text != plain.text  # so the command's output below tells which rendering it sampled
    run = tmp_path / "run"  # a run trained with --chat-template-kwargs '{"upbeat": true}'
    model.save_pretrained(run)
    chat.save_pretrained(run)
    (run / "dpokit_config.yaml").write_text(yaml.safe_dump(
        {"model": {"model": "base"}, "data": {"chat_template_kwargs": '{"upbeat": true}'}}))
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": messages}])
    out = tmp_path / "samples.jsonl"
    assert cli.main(["sample", "--model", str(run), "--prompts", str(prompts), "--temperature", "0",
                     "--max-new-tokens", "4", "--output", str(out), "--progress", "off"]) == 0
    assert json.loads(out.read_text())["completions"] == [upbeat.text]
