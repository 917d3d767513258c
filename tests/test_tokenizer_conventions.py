"""Tokenizer conventions of the model families users bring: for each, kept pairs decode to exactly
the rendered text under the documented BOS/EOS rule (src/dpokit/data/tokenize.py, rule 1), and
sampling encodes a prompt to exactly the ids training gives it.

Each convention is a tiny byte-level BPE tokenizer (exact decoding) set up with that family's
special tokens: which BOS and EOS it has, whether its own encoding adds BOS, and its chat template.
Adding a family is one line in CONVENTIONS."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from conftest import TEST_DATA
from dpokit.config import SamplingConfig
from dpokit.data import read_pairs
from dpokit.data.pairs import PreferencePair
from dpokit.data.tokenize import PairTokenizer
from dpokit.eval.sampling import encode_prompt, generate_completions
from helpers.toy import make_pairs

# ChatML (Qwen2.5, SmolLM2): every turn, the assistant's included, ends with <|im_end|> and a newline.
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Gemma: writes BOS itself (on top of a tokenizer that adds it) and marks turns with its own tokens.
GEMMA = ("{{ bos_token }}{% for m in messages %}<start_of_turn>"
         "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
         "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


@dataclass(frozen=True)
class Convention:
    bos: str | None  # the tokenizer's BOS token, None when it has none
    eos: str
    adds_bos: bool  # whether the tokenizer's own encoding (add_special_tokens=True) starts with BOS
    pad: str | None = None
    extra: tuple[str, ...] = ()  # further special tokens (template markers)
    template: str | None = None


CONVENTIONS = {
    "llama": Convention("<s>", "</s>", adds_bos=True, extra=("<unk>",)),  # BOS added
    "gpt2": Convention("<|endoftext|>", "<|endoftext|>", adds_bos=False),  # BOS == EOS, not added
    "pythia": Convention("<|endoftext|>", "<|endoftext|>", adds_bos=False, extra=("<|padding|>",)),
    "opt": Convention("</s>", "</s>", adds_bos=True, pad="<pad>"),  # BOS == EOS, added
    "qwen2.5": Convention(None, "<|endoftext|>", adds_bos=False, extra=("<|im_start|>", "<|im_end|>"),
                          template=CHATML),  # no BOS; the template's turn end is not EOS
    "qwen2.5-instruct": Convention(None, "<|im_end|>", adds_bos=False, pad="<|endoftext|>",
                                   extra=("<|im_start|>",), template=CHATML),  # EOS after every turn
    "smollm2": Convention("<|im_start|>", "<|im_end|>", adds_bos=False, template=CHATML),  # BOS != EOS, not added
    "gemma": Convention("<bos>", "<eos>", adds_bos=True, pad="<pad>", extra=("<start_of_turn>", "<end_of_turn>"),
                        template=GEMMA),  # turn markers
}

CORPUS = ["Question: what is the capital of France? Answer: Paris. London, I think.",
          "system user assistant model be brief hello world the film was great fun dull",
          "héllo wörld — ça va? yes no\n\n  indented  text"] * 8


def build(convention: Convention):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(dict.fromkeys(t for t in (convention.pad, convention.bos, convention.eos, *convention.extra) if t))
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer=trainer)
    if convention.adds_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{convention.bos} $A", pair=f"{convention.bos} $A $B",
            special_tokens=[(convention.bos, tok.token_to_id(convention.bos))])
    tokens = {"bos_token": convention.bos, "eos_token": convention.eos, "pad_token": convention.pad}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **{k: v for k, v in tokens.items() if v})
    fast.chat_template = convention.template
    return fast


def text_pairs(convention: Convention) -> list[PreferencePair]:
    rows = [
        ("Question: what is the capital of France?\nAnswer:", " Paris.", " London, I think."),
        ("héllo wörld —", " ça va?\n\n  yes", " no "),  # unicode, blank lines, a trailing space
        ("the film was", " great fun" + convention.eos, " dull" + convention.eos + "\n"),  # EOS already written
    ]
    if convention.bos:
        rows.append((convention.bos + "the film was", " great", " dull"))  # BOS already written
    return [PreferencePair(p, c, r, i) for i, (p, c, r) in enumerate(rows, start=1)]


def chat_pairs() -> list[PreferencePair]:
    prompt = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
              {"role": "assistant", "content": "hello world"},
              {"role": "user", "content": "what is the capital of France?"}]
    return [PreferencePair(prompt, [{"role": "assistant", "content": "Paris."}],
                           [{"role": "assistant", "content": "London, I think."}], 1),
            PreferencePair(prompt[-1:], [{"role": "assistant", "content": "Paris"}],
                           [{"role": "assistant", "content": "ça va?\n\n  London"}], 2)]


def expected_sequence(convention: Convention, prompt: str, response: str) -> str:
    """Rule 1, written out for text: BOS once (kept when written, added when the tokenizer adds
    it), EOS once at the end of the response (whitespace written after a final EOS is dropped)."""
    head = convention.bos if convention.adds_bos and not prompt.startswith(convention.bos) else ""
    tail = response.rstrip()
    return head + prompt + (tail if tail.endswith(convention.eos) else response + convention.eos)


def _pairs(name: str) -> tuple[Convention, object, list[PreferencePair]]:
    convention = CONVENTIONS[name]
    pairs = text_pairs(convention) + (chat_pairs() if convention.template else [])
    return convention, build(convention), [PreferencePair(p.prompt, p.chosen, p.rejected, i)
                                           for i, p in enumerate(pairs, start=1)]


def _decode(tok, ids) -> str:
    return tok.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("name", sorted(CONVENTIONS))
def test_kept_pairs_decode_to_the_rendered_text(name):
    convention, tok, pairs = _pairs(name)
    assert (tok.bos_token_id == tok.eos_token_id) == (convention.bos == convention.eos)  # the premise
    assert (tok("a")["input_ids"][0] == tok.bos_token_id) == convention.adds_bos
    pair_tokenizer = PairTokenizer(tok, max_length=256)
    kept, stats = pair_tokenizer.tokenize(pairs)
    assert stats.skipped == {} and len(kept) == len(pairs), stats.examples
    for pair, tokenized in zip(pairs, kept, strict=True):
        prompt, chosen, rejected = pair_tokenizer.render(pair)
        for response, ids in ((chosen, tokenized.chosen_ids), (rejected, tokenized.rejected_ids)):
            sequence = tokenized.prompt_ids + ids
            assert _decode(tok, sequence) == expected_sequence(convention, prompt, response), (name, pair.index)
            assert ids[-1] == tok.eos_token_id and tok.eos_token_id not in ids[:-1]
            if tok.bos_token_id is not None and tok.bos_token_id != tok.eos_token_id:
                assert tok.bos_token_id not in ids
            if convention.adds_bos or prompt.startswith(convention.bos or "\0"):
                assert sequence[0] == tok.bos_token_id and sequence[1] != tok.bos_token_id
            elif tok.bos_token_id is not None:
                assert sequence[0] != tok.bos_token_id


@pytest.mark.parametrize("name", sorted(CONVENTIONS))
def test_sampling_encodes_prompts_as_training_does(name):
    _, tok, pairs = _pairs(name)
    kept, _ = PairTokenizer(tok, max_length=256).tokenize(pairs)
    assert len(kept) == len(pairs)
    for pair, tokenized in zip(pairs, kept, strict=True):
        assert encode_prompt(tok, pair.prompt) == list(tokenized.prompt_ids), (name, pair.index)


def test_bos_equal_to_eos_trains_end_to_end(toy_data, tmp_path, capsys):
    """GPT-2, the DPO paper's own family: every row used to be skipped as a stray BOS."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config

    from dpokit import cli

    tok = build(CONVENTIONS["gpt2"])
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=128,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model_dir = tmp_path / "model"
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    out = tmp_path / "run"
    code = cli.main(["train", "--model", str(model_dir), "--data", str(toy_data[0]), "--output", str(out),
                     "--max-steps", "2", "--batch-size", "4", "--max-length", "64", "--progress", "off"])
    log = capsys.readouterr().out
    assert code == 0 and "64/64 pairs kept" in log, log
    trained = AutoModelForCausalLM.from_pretrained(out)
    row = make_pairs(1, seed=1)[0]  # the first training row
    [tokenized], _ = PairTokenizer(tok, max_length=64).tokenize([PreferencePair(**row, index=1)])
    [(_, [completion])] = generate_completions(trained, tok, [row["prompt"]], SamplingConfig(max_new_tokens=3))
    assert completion.prompt_ids == tokenized.prompt_ids  # sampled in the context it was trained on


def test_sampling_a_prompt_the_template_refuses_is_one_line_naming_it():
    from dpokit.errors import DpokitError

    tok = build(CONVENTIONS["gemma"])
    tok.chat_template = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
    with pytest.raises(DpokitError, match=r"^prompt 2: the chat template failed: no system role$"):
        encode_prompt(tok, [{"role": "system", "content": "be brief"}], "prompt 2")


@pytest.mark.parametrize("name", sorted(CONVENTIONS))
def test_an_empty_prompt_needs_a_bos_to_start_from(name):
    """Without BOS nothing would precede the first response token (batching would score it from
    the wrong column): the pair is skipped; with BOS the prompt is BOS alone."""
    convention, tok, _ = _pairs(name)
    kept, stats = PairTokenizer(tok, max_length=64).tokenize([PreferencePair("", " Paris.", " London.", 7)])
    if convention.adds_bos:
        assert [list(p.prompt_ids) for p in kept] == [[tok.bos_token_id]]
    else:
        assert kept == [] and stats.skipped == {"empty_prompt": [7]}


# 20 real rows of each, carried with the tests (tests/data/SOURCES.md).
REAL_FILES = {"text": "hh_rlhf_explicit_prompt_first20.jsonl", "chat": "ultrafeedback_h4schema_20short.jsonl"}


@pytest.mark.parametrize("name", sorted(CONVENTIONS))
def test_real_rows_decode_exactly_and_sample_as_trained(name):
    """The real samples (HH-RLHF text rows; UltraFeedback conversations where a template exists)."""
    convention = CONVENTIONS[name]
    tok = build(convention)
    source = TEST_DATA / REAL_FILES["chat" if convention.template else "text"]
    pairs = list(read_pairs(str(source)))
    assert len(pairs) == (19 if convention.template else 20)  # the chat file's row 12 is identical: skipped on reading
    pair_tokenizer = PairTokenizer(tok, max_length=10**6)
    kept, stats = pair_tokenizer.tokenize(pairs)
    assert stats.skipped == {} and len(kept) == len(pairs), stats.examples
    for pair, tokenized in zip(pairs, kept, strict=True):
        prompt, chosen, rejected = pair_tokenizer.render(pair)
        for response, ids in ((chosen, tokenized.chosen_ids), (rejected, tokenized.rejected_ids)):
            assert _decode(tok, tokenized.prompt_ids + ids) == expected_sequence(convention, prompt, response)
        assert encode_prompt(tok, pair.prompt) == list(tokenized.prompt_ids)
