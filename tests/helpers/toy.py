"""A tiny, offline DPO task: a small Llama built from a config, a tokenizer trained on the spot,
and preference pairs whose chosen responses use "upbeat" words and rejected ones "gloomy" words.

Test fixtures (and the benchmarks' tiny models): built from configs, nothing downloaded.
`dpokit demo` runs the DPO paper's sentiment experiment instead (`dpokit.experiments.demo`).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from dpokit.experiments.demo.tokenizer import SPECIAL_TOKENS, llama_style, train_bpe_tokenizer

OPENERS = ["the film", "this movie", "the plot", "the cast", "the ending", "the music", "the story", "my friend"]
NEUTRAL = ["was", "felt", "seemed", "is", "looked", "sounded", "became", "stayed", "and", "so", "very", "quite"]
UPBEAT = ["great", "lovely", "wonderful", "bright", "brilliant", "moving", "fun", "charming", "superb", "warm"]
GLOOMY = ["dull", "awful", "boring", "bleak", "clumsy", "tedious", "flat", "weak", "grim", "messy"]


def toy_words() -> list[str]:
    return sorted({w for phrase in OPENERS for w in phrase.split()} | set(NEUTRAL) | set(UPBEAT) | set(GLOOMY))


def build_tokenizer(kind: str = "word", corpus: list[str] | None = None, vocab_size: int = 300):
    """A Llama-style tokenizer (adds BOS, has EOS and PAD) trained with `tokenizers`.

    kind="word": one token per word (whitespace split). kind="bpe": byte-level BPE trained on
    `corpus`, whose merges can cross a prompt/response boundary (the demo's own tokenizer).
    """
    corpus = corpus or [" ".join(toy_words())]
    if kind == "bpe":
        return train_bpe_tokenizer(corpus, vocab_size)
    if kind != "word":
        raise ValueError(f"unknown tokenizer kind {kind!r}")
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + toy_words())}
    for text in corpus:
        for word in text.split():
            vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return llama_style(tok)


def build_tiny_llama(tokenizer, seed: int = 0, hidden: int = 64, layers: int = 2, heads: int = 4):
    """A randomly initialised Llama of ~100k parameters, built from a config (no download)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def make_pairs(n: int, seed: int, openers: list[str] | None = None) -> list[dict[str, str]]:
    """Pairs with a shared prompt; chosen uses upbeat words, rejected gloomy ones."""
    rng = random.Random(seed)
    openers = openers or OPENERS
    rows = []
    for _ in range(n):
        prompt = f"{rng.choice(openers)} {rng.choice(NEUTRAL)}"
        length = rng.randint(2, 5)
        chosen = " ".join(rng.choice(UPBEAT if i % 2 == 0 else NEUTRAL) for i in range(length))
        rejected = " ".join(rng.choice(GLOOMY if i % 2 == 0 else NEUTRAL) for i in range(rng.randint(2, 5)))
        rows.append({"prompt": prompt, "chosen": " " + chosen, "rejected": " " + rejected})
    return rows


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def save_tiny_model(folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny Llama and its word tokenizer as a Hugging Face model folder."""
    folder = Path(folder)
    tokenizer = build_tokenizer("word")
    model = build_tiny_llama(tokenizer, seed=seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
