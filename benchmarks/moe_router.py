"""The MoE router's load-balancing term on tiny models (tests/helpers/moe_families.py), three figures:

1. `layouts`: per MoE family, the largest gap between each layout's (packed, prefix-shared; both LM
   heads) load-balancing loss and transformers' own on the padded batch;
2. `accumulation`: how far the mean of micro-batch aux losses (the term under accumulation and
   torchrun, as TRL has it) is from the aux loss of the whole batch: it is a product of two means
   over tokens, not a sum over pairs;
3. `load`: a short run with and without the term: aux_loss and the busiest expert's share.

Tiny random models (hidden 16, 4 experts, top-2) and toy pairs: correctness and direction, not a
statement about real MoE checkpoints. Run: python benchmarks/moe_router.py [layouts|accumulation|load]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from dpokit.config import DataConfig, build_config
from dpokit.data import PairTokenizer, load_tokenized_pairs
from dpokit.data.batching import LAYOUTS, collate
from dpokit.data.order import epoch_order
from dpokit.model.attention import layout_blocker
from dpokit.model.logprobs import head_is_plain, sequence_logps
from dpokit.model.router_loss import router_loss_for
from dpokit.train.loop import train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tiny-model builders
from helpers.families import family_pairs  # noqa: E402
from helpers.moe_families import MOE_FAMILIES, build_moe  # noqa: E402
from helpers.toy import build_tokenizer, make_pairs, write_jsonl  # noqa: E402

quiet = lambda _line: None  # noqa: E731
FIGURES = ("layouts", "accumulation", "load")


def own_aux(model, batch) -> float:
    with torch.no_grad():
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_router_logits=True,
                     use_cache=False).aux_loss.item()


def layouts(tok) -> None:
    pairs = family_pairs(tok)
    padded = collate(pairs, tok.pad_token_id, "padded")
    for family in sorted(MOE_FAMILIES):
        model = build_moe(family, tok).eval()
        router, reference = router_loss_for(model, None, quiet), own_aux(model, padded)
        gaps = {}
        for layout in LAYOUTS:
            if layout_blocker(model, layout) is not None:
                gaps[layout] = "excluded"
                continue
            batch = collate(pairs, tok.pad_token_id, layout, 24)
            with torch.no_grad():
                gaps[layout] = max(abs(sequence_logps(model, batch, chunked_head=c, router=router).router.aux_loss.item()
                                       - reference) for c in ([False, True] if head_is_plain(model) else [False]))
        shown = ", ".join(f"{k} {v:.1e}" if isinstance(v, float) else f"{k} {v}" for k, v in gaps.items())
        print(f"{family}: coef {router.coef:g}, padded aux {reference:.5f}; gap to it: {shown}")


def accumulation(tok, folder: Path, families=("mixtral", "qwen3-moe"), steps: int = 32) -> None:
    data = write_jsonl(folder / "train.jsonl", make_pairs(256, seed=3))
    pairs = load_tokenized_pairs(str(data), PairTokenizer.from_config(tok, DataConfig(max_length=32)), quiet)
    order = epoch_order(len(pairs), 42, 0)
    for family in families:
        model = build_moe(family, tok).train()

        def aux(indices, model=model):
            return own_aux(model, collate([pairs[i] for i in indices], tok.pad_token_id, "padded"))

        for micro in (4, 2):
            gaps = []
            for s in range(steps):
                step = order[8 * s : 8 * s + 8]
                parts = [aux(step[i : i + micro]) for i in range(0, 8, micro)]
                whole = aux(step)
                gaps.append((sum(parts) / len(parts) - whole) / whole)
            print(f"{family}: batch 8 vs {8 // micro} x {micro}: (mean of micro-batches - batch) / batch: mean "
                  f"{sum(gaps) / len(gaps):+.2e}, largest {max(gaps, key=abs):+.2e}, above in "
                  f"{sum(g > 0 for g in gaps)}/{steps} steps")


def load(tok, folder: Path, family: str = "qwen3-moe", steps: int = 128) -> None:
    model_dir = folder / family
    build_moe(family, tok, "sdpa").save_pretrained(model_dir)
    tok.save_pretrained(folder / "tok")
    data = write_jsonl(folder / "train.jsonl", make_pairs(256, seed=3))
    for coef in (0.0, 0.001, 0.1):
        out = folder / f"run-{coef:g}"
        cfg = build_config({"model": {"model": str(model_dir), "tokenizer": str(folder / "tok")},
                            "data": {"data": str(data), "max_length": 32}, "loss": {"router_aux_loss_coef": coef},
                            "train": {"output": str(out), "max_steps": steps, "batch_size": 8, "learning_rate": 3e-3,
                                      "log_every": 16, "progress": "off"}})
        train(cfg, log=quiet)
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        shown = " ".join(f"{r['step']}:{r['aux_loss']:.3f}/{r['router/max_expert_share']:.3f}/"
                         f"{r['router/max_expert_share_busiest_layer']:.3f}" for r in records if "loss" in r)
        last = records[-1]
        print(f"{family} coef {coef:g} (step: aux/share/busiest layer's share): {shown}; final accuracy "
              f"{last['rewards/accuracies']:.2f}, margin {last['rewards/margins']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("figures", nargs="*", help=f"any of {', '.join(FIGURES)} (default: all)")
    args = parser.parse_args()
    if set(args.figures) - set(FIGURES):
        parser.error(f"figures are {', '.join(FIGURES)}")
    tok = build_tokenizer("word")
    with tempfile.TemporaryDirectory() as scratch:
        for figure in args.figures or FIGURES:
            print(f"--- {figure}")
            {"layouts": lambda: layouts(tok), "accumulation": lambda: accumulation(tok, Path(scratch)),
             "load": lambda: load(tok, Path(scratch))}[figure]()


if __name__ == "__main__":
    main()
