"""Pretrain the demo's base model from scratch on the generated review corpus.

    python -m dpokit.experiments.demo.pretrain [--output DIR] [--steps N] [--seed S] [--overwrite]

regenerates the model folder that ships under `dpokit/experiments/demo/base_model/`: a byte-level BPE
tokenizer trained with `tokenizers` on the corpus, a small Llama (transformers) trained by next-token
prediction on packed windows of reviews, and MANIFEST.json with each file's sha256, the model
config, the corpus seed and size, the training steps and the final training and held-out losses.
Nothing is downloaded and no pretrained weights are used. CPU only; torch threads default to 2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from dpokit.errors import DpokitError
from dpokit.eval.sampling import encode_prompt
from dpokit.experiments.demo.bundled import BASE_MODEL_DIR, MANIFEST, file_sha256
from dpokit.experiments.demo.corpus import generate_corpus, review_openings
from dpokit.experiments.demo.tokenizer import train_bpe_tokenizer
from dpokit.io import atomic_save_pretrained, atomic_write_text
from dpokit.paths import check_creatable, claim_output_folder

HELD_OUT_SEED_OFFSET = 1_000_003  # the held-out reviews come from a different stream of the grammar


@dataclass
class PretrainSettings:
    """Every knob of the run; the defaults are the ones that made the shipped model."""

    output: str = str(BASE_MODEL_DIR)
    seed: int = 0
    steps: int = 600
    reviews: int = 40_000
    held_out_reviews: int = 1_000
    tokenizer_reviews: int = 20_000  # BPE merges are learnt from this many reviews of the corpus
    vocab_size: int = 2048
    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate_size: int = 352
    block_size: int = 128
    batch_size: int = 16
    learning_rate: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0
    threads: int = 2
    log_every: int = 100
    samples: int = 4  # continuations of held-out openings written into the manifest
    overwrite: bool = False


def _token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """All texts as one stream: BOS review EOS BOS review EOS ..."""
    ids: list[int] = []
    for encoded in tokenizer(texts)["input_ids"]:  # the post-processor puts BOS first
        ids.extend(encoded)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def _build_model(tokenizer, s: PretrainSettings):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=s.hidden_size,
        intermediate_size=s.intermediate_size,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        max_position_embeddings=2 * s.block_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        # Tied: the embedding is a quarter of the weights at this size; untying would add
        # vocab x hidden parameters (~0.9 MB) to a model whose corpus has under 2k word types.
        tie_word_embeddings=True,
    )
    torch.manual_seed(s.seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


@torch.no_grad()
def held_out_loss(model, stream: torch.Tensor, block_size: int, batch_size: int = 32) -> float:
    """Mean next-token loss (nats) over non-overlapping windows of the held-out stream."""
    model.eval()
    n_blocks = (len(stream) - 1) // block_size
    windows = stream[: n_blocks * block_size].view(n_blocks, block_size)
    total, count = 0.0, 0
    for start in range(0, n_blocks, batch_size):
        batch = windows[start : start + batch_size]
        targets = batch.numel() - batch.shape[0]  # each row predicts all but its first token
        total += model(input_ids=batch, labels=batch).loss.item() * targets
        count += targets
    model.train()
    return total / count


def unigram_cross_entropy(train: torch.Tensor, held_out: torch.Tensor, vocab_size: int) -> float:
    """Held-out cross-entropy (nats/token) of the train stream's add-one unigram model: the bar a
    language model must clear by far to have learnt anything beyond word frequencies."""
    counts = torch.bincount(train, minlength=vocab_size).double() + 1.0
    logp = (counts / counts.sum()).log()
    return float(-logp[held_out].mean())


@torch.no_grad()
def sample_reviews(model, tokenizer, prompts: list[str], seed: int, max_new_tokens: int = 48) -> list[str]:
    """Continuations at temperature 1.0, top-p 0.95: how the demo will sample the base policy."""
    model.eval()
    torch.manual_seed(seed)
    out = []
    for prompt in prompts:
        ids = torch.tensor([encode_prompt(tokenizer, prompt)])  # as training and `dpokit sample` encode it
        generated = model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_p=0.95, top_k=0,
            max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
        )
        out.append(prompt + tokenizer.decode(generated[0, ids.shape[1] :], skip_special_tokens=True))
    model.train()
    return out


def pretrain(s: PretrainSettings) -> dict:
    """Run the whole recipe and write the model folder; returns the manifest."""
    if s.steps < 1 or s.reviews < 2 or s.held_out_reviews < 1 or s.samples < 0:
        raise DpokitError("--steps, --reviews, --held-out-reviews must be positive and --samples >= 0")
    folder = Path(s.output)
    check_creatable(folder, "--output")
    claim_output_folder(folder, overwrite=s.overwrite, hint="pass --overwrite to replace the model there")
    torch.set_num_threads(s.threads)
    started = time.perf_counter()

    corpus, tokenizer, train_stream, held_stream, unigram = _corpus_streams(s)
    model = _build_model(tokenizer, s)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters", flush=True)
    train_loss = _train_steps(model, train_stream, s)
    eval_loss = held_out_loss(model, held_stream, s.block_size)
    prompts = review_openings(s.samples, seed=s.seed, held_out=True, min_words=3)
    samples = sample_reviews(model, tokenizer, prompts, seed=s.seed)
    wall = time.perf_counter() - started
    print(f"final: train loss {train_loss:.4f}, held-out loss {eval_loss:.4f} nats "
          f"(unigram {unigram:.3f}); {wall:.0f} s", flush=True)

    model.generation_config.pad_token_id = tokenizer.pad_token_id
    previous = _read_manifest_files(folder)
    atomic_save_pretrained(folder, model, tokenizer)
    written = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != MANIFEST and not p.name.startswith("."))
    for stale in previous - set(written):  # only files an earlier run of this script wrote
        (folder / stale).unlink(missing_ok=True)
    config = model.config.to_dict()
    manifest = {
        "description": "dpokit demo base model: a small Llama pretrained from scratch on dpokit.experiments.demo.corpus reviews",
        "files": {name: {"sha256": file_sha256(folder / name), "bytes": (folder / name).stat().st_size} for name in written},
        "model_config": {k: config[k] for k in sorted(config) if isinstance(config[k], (int, float, str, bool))},
        "parameters": n_params,
        "corpus": {
            "generator": "dpokit.experiments.demo.corpus.generate_corpus", "seed": s.seed, "reviews": s.reviews,
            "train_tokens": len(train_stream), "held_out_seed": s.seed + HELD_OUT_SEED_OFFSET,
            "held_out_reviews": s.held_out_reviews, "held_out_tokens": len(held_stream),
            "sha256": hashlib.sha256("\n".join(corpus).encode("utf-8")).hexdigest(),
        },
        "training": {
            "settings": {k: v for k, v in asdict(s).items() if k not in ("output", "overwrite")},
            "steps": s.steps, "tokens_seen": s.steps * s.batch_size * s.block_size,
            "final_train_loss": round(train_loss, 4), "held_out_loss": round(eval_loss, 4),
            "unigram_cross_entropy": round(unigram, 4), "loss_unit": "nats per token",
            "wall_seconds": round(wall, 1), "torch_threads": s.threads, "torch": torch.__version__,
            "transformers": _version("transformers"), "tokenizers": _version("tokenizers"),
        },
        "samples": {"temperature": 1.0, "top_p": 0.95, "max_new_tokens": 48, "seed": s.seed, "texts": samples},
    }
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest


def _corpus_streams(s: PretrainSettings) -> tuple[list[str], Any, torch.Tensor, torch.Tensor, float]:
    """The generated corpus, the BPE tokenizer learnt on it, the train and held-out token streams,
    and the unigram bar the model must clear."""
    corpus = generate_corpus(s.reviews, s.seed)
    held_out = generate_corpus(s.held_out_reviews, s.seed + HELD_OUT_SEED_OFFSET)
    tokenizer = train_bpe_tokenizer(corpus[: s.tokenizer_reviews], vocab_size=s.vocab_size)
    train_stream = _token_stream(tokenizer, corpus)
    held_stream = _token_stream(tokenizer, held_out)
    if len(train_stream) <= s.block_size + 1:
        raise DpokitError(f"--reviews {s.reviews} gives too few tokens for --block-size {s.block_size}")
    unigram = unigram_cross_entropy(train_stream, held_stream, len(tokenizer))
    print(f"corpus: {s.reviews} reviews, {len(train_stream)} tokens; held out: {len(held_stream)} tokens; "
          f"vocab {len(tokenizer)}; unigram cross-entropy {unigram:.3f} nats", flush=True)
    return corpus, tokenizer, train_stream, held_stream, unigram


def _train_steps(model, train_stream: torch.Tensor, s: PretrainSettings) -> float:
    """Next-token training on random windows of the packed stream; returns the mean of the last 50 losses."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=s.learning_rate, betas=(0.9, 0.95),
    )
    warmup = min(s.warmup_steps, max(1, s.steps // 10))

    def lr_factor(step: int) -> float:  # linear warm-up, cosine to a tenth of the peak
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, s.steps - warmup)
        return 0.1 + 0.45 * (1.0 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    generator = torch.Generator().manual_seed(s.seed)
    model.train()
    recent: list[float] = []
    tick = time.perf_counter()
    for step in range(s.steps):
        # Random windows of the packed stream: every review is seen about
        # steps * batch * block / tokens times, from varied offsets.
        starts = torch.randint(0, len(train_stream) - s.block_size, (s.batch_size,), generator=generator)
        batch = torch.stack([train_stream[i : i + s.block_size] for i in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        recent = (recent + [loss.item()])[-50:]
        if (step + 1) % s.log_every == 0 or step + 1 == s.steps:
            rate = s.log_every * s.batch_size * s.block_size / (time.perf_counter() - tick)
            print(f"step {step + 1}/{s.steps}  loss {sum(recent) / len(recent):.4f}  "
                  f"lr {scheduler.get_last_lr()[0]:.2e}  {rate:,.0f} tokens/s", flush=True)
            tick = time.perf_counter()
    return sum(recent) / len(recent)


def _read_manifest_files(folder: Path) -> set[str]:
    try:
        return set(json.loads((folder / MANIFEST).read_text(encoding="utf-8"))["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def parse_args(argv: list[str] | None) -> PretrainSettings:
    defaults = PretrainSettings()
    parser = argparse.ArgumentParser(prog="python -m dpokit.experiments.demo.pretrain", description=__doc__.split("\n")[0],
                                     allow_abbrev=False)
    for name, value in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action="store_true", help=f"(default: {value})")
        else:
            parser.add_argument(flag, type=type(value), default=value, help=f"(default: {value})")
    return PretrainSettings(**vars(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    try:
        pretrain(parse_args(argv))
    except DpokitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
