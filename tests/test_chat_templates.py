"""Chat templates: BOS once and EOS once whoever writes them, and tokens that decode to the
rendered text exactly."""

import pytest

from dpokit.config import DataConfig
from dpokit.data.pairs import PreferencePair
from dpokit.data.tokenize import PairTokenizer
from dpokit.errors import DpokitError
from helpers.toy import build_tokenizer

# Writes BOS itself (as Llama-3 and Gemma templates do) on top of a tokenizer that also adds BOS.
TEMPLATE_WITH_BOS = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# Ends each assistant turn with EOS and a newline (as ChatML's `<|im_end|>\n` does).
TEMPLATE_WITH_EOS = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
CORPUS = ["<|user|> <|assistant|> <|system|> what is the capital of france? paris. london. be brief",
          "hello world, the weather is lovely today"] * 10


def _tokenizer(template):
    tok = build_tokenizer("bpe", corpus=CORPUS, vocab_size=300)
    tok.chat_template = template
    return tok


def _chat_pair(index=1):
    prompt = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
              {"role": "assistant", "content": "hello world"}, {"role": "user", "content": "what is the capital?"}]
    return PreferencePair(prompt, [{"role": "assistant", "content": "paris."}],
                          [{"role": "assistant", "content": "london, I think."}], index)


@pytest.mark.parametrize("template", [TEMPLATE_WITH_BOS, TEMPLATE_WITH_EOS], ids=["adds-bos", "adds-eos"])
def test_one_bos_one_eos_and_exact_text_under_a_template(template):
    tok = _tokenizer(template)
    pair = _chat_pair()
    [tp], stats = PairTokenizer(tok, max_length=512).tokenize([pair])
    assert stats.kept == 1 and stats.boundary_merges == 0
    bos, eos = tok.bos_token_id, tok.eos_token_id
    for reply, response_ids in ((pair.chosen, tp.chosen_ids), (pair.rejected, tp.rejected_ids)):
        sequence = tp.prompt_ids + response_ids
        assert sequence[0] == bos and sequence.count(bos) == 1
        assert response_ids[-1] == eos and response_ids.count(eos) == 1
        full = tok.apply_chat_template(pair.prompt + reply, tokenize=False)
        prompt = tok.apply_chat_template(pair.prompt, tokenize=False, add_generation_prompt=True)
        assert tok.decode(tp.prompt_ids, skip_special_tokens=False) == (
            prompt if prompt.startswith(tok.bos_token) else tok.bos_token + prompt)
        decoded = tok.decode(sequence, skip_special_tokens=False)
        if template == TEMPLATE_WITH_BOS:
            assert full.startswith(tok.bos_token) and not full.endswith(tok.eos_token + "\n")
            assert decoded == full + tok.eos_token  # the one EOS was added by us
        else:
            assert full.endswith(tok.eos_token + "\n")
            assert decoded == tok.bos_token + full.removesuffix("\n")  # BOS from the tokenizer, EOS kept once


def test_template_from_config_file_and_missing_template(tmp_path):
    tok = build_tokenizer("bpe", corpus=CORPUS, vocab_size=300)
    with pytest.raises(DpokitError, match="needs a chat template.*--chat-template"):
        PairTokenizer(tok, max_length=64).tokenize([_chat_pair()])
    file = tmp_path / "t.jinja"
    file.write_text(TEMPLATE_WITH_EOS)
    pair_tokenizer = PairTokenizer.from_config(tok, DataConfig(chat_template=str(file), max_length=512))
    assert tok.chat_template == TEMPLATE_WITH_EOS  # the saved tokenizer will carry it
    [tp], _ = pair_tokenizer.tokenize([_chat_pair()])
    assert tp.chosen_ids.count(tok.eos_token_id) == 1
    with pytest.raises(DpokitError, match="--chat-template .*nope.jinja does not exist"):
        PairTokenizer.from_config(tok, DataConfig(chat_template=str(tmp_path / "nope.jinja")))


def test_templates_that_break_the_boundary_or_raise_are_skipped_by_reason():
    tok = _tokenizer(
        # renders the generation prompt differently from the assistant turn: no exact boundary
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )
    out, stats = PairTokenizer(tok, max_length=512).tokenize([_chat_pair(3)])
    assert out == [] and stats.skipped == {"template_boundary": [3]}
    with pytest.raises(DpokitError, match=r"row 3: the chat template renders the prompt differently.*--strict"):
        PairTokenizer(tok, max_length=512, strict=True).tokenize([_chat_pair(3)])
    tok.chat_template = "{{ raise_exception('system messages are not supported') }}"
    out, stats = PairTokenizer(tok, max_length=512).tokenize([_chat_pair(4)])
    assert stats.skipped == {"template_error": [4]}
    assert "system messages are not supported" in stats.examples["template_error"]


def test_truncation_keep_start_cuts_the_prompt_end():
    tok = build_tokenizer("word")
    words = ["the", "film", "was", "very", "great", "and", "the", "plot", "was", "fun"]
    pair = PreferencePair(" ".join(words), " great", " dull", 1)
    [kept_end], _ = PairTokenizer(tok, max_length=8, max_prompt_length=5).tokenize([pair])
    [kept_start], _ = PairTokenizer(tok, max_length=8, max_prompt_length=5,
                                    truncation_mode="keep_start").tokenize([pair])
    assert tok.decode(kept_end.prompt_ids, skip_special_tokens=False).split() == ["<s>", *words[-4:]]
    assert tok.decode(kept_start.prompt_ids, skip_special_tokens=False).split() == ["<s>", *words[:4]]
    with pytest.raises(DpokitError, match="--truncation-mode must be one of keep_end, keep_start"):
        PairTokenizer(tok, max_length=8, truncation_mode="middle")
