"""How much of DPO's margin sits on EOS tokens that cut-off samples never generated (issue 15, part 1).

    PYTHONPATH=src .venv/bin/python benchmarks/invented_eos.py [--prompts 128] [--steps 40] [--json out.json]

Draws the demo's offline pair samples (the bundled base model, its training prompts, sampling
seed and settings: `dpokit demo`'s step 1), then builds two pair files from the same samples:

- `forced`: the pairs as before issue 15 - every sample paired (`--pairing all`), no
  `*_finished` fields, so tokenization gives every response an EOS, cut-off ones included;
- `marked`: the pairs as `sample_preference_pairs` builds them now - the same pairs (with the
  demo's `--pairing all`; `best_worst` would prefer finished samples), cut responses marked
  unfinished, so they get no EOS.

Each is DPO-trained from the base model with the demo's settings (β 1, 40 steps of 32 pairs, lr
7e-4), and its margin β·Σ(log π − log π_ref) over chosen minus rejected is split per token: the share
carried by invented EOS tokens (an EOS ending a response whose sample was cut) is reported, with
how many samples were cut and how many pairs hold a cut chosen / rejected response.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from dpokit.config import JudgeConfig, SamplingConfig
from dpokit.data import PairTokenizer, load_tokenized_pairs, read_pairs
from dpokit.data.batching import collate_padded
from dpokit.eval.evaluate import Sampler
from dpokit.eval.judges import load_judge
from dpokit.eval.sampling import SampleSet
from dpokit.experiments.demo.bundled import base_model_dir
from dpokit.experiments.demo.corpus import review_openings
from dpokit.experiments.demo.sentiment import PRESETS, DemoSettings, _run_config
from dpokit.experiments.online import preference_pairs, write_pairs
from dpokit.model.load import load_policy, load_tokenizer
from dpokit.model.logprobs import token_logps
from dpokit.train.loop import train


def demo_samples(s: DemoSettings, model, tokenizer) -> tuple[list[str], SampleSet]:
    """The demo's offline samples: its training prompts, K per prompt, judged by VADER (same seeds)."""
    prompts = review_openings(s.train_prompts, seed=s.seed, held_out=False)
    sampling = SamplingConfig(num_samples=s.samples_per_prompt, max_new_tokens=s.max_new_tokens,
                              sample_seed=s.seed + 1000, sample_batch_size=s.sample_batch_size)
    sampler = Sampler(tokenizer, sampling, judge=load_judge("sentiment"),
                      judging=JudgeConfig(judge="sentiment", judge_batch_size=256))
    return prompts, sampler.draw(model, prompts)


def pair_files(prompts: list[str], samples: SampleSet, pairing: str, folder: Path) -> dict[str, tuple[Path, list]]:
    """{"forced": ..., "marked": ...}: each a pair file and, per row, (chosen cut, rejected cut)."""
    forced, _ = preference_pairs(prompts, samples.texts, samples.rewards, pairing)
    cut_texts = [{t for t, done in zip(texts, ends, strict=True) if not done}
                 for texts, ends in zip(samples.texts, samples.finished, strict=True)]
    by_prompt = {p: i for i, p in enumerate(prompts)}
    forced_cut = [(r["chosen"] in cut_texts[by_prompt[r["prompt"]]], r["rejected"] in cut_texts[by_prompt[r["prompt"]]])
                  for r in forced]
    marked, _ = preference_pairs(prompts, samples.texts, samples.rewards, pairing, samples.finished)
    marked_cut = [(not r["chosen_finished"], not r["rejected_finished"]) for r in marked]
    return {"forced": (write_pairs(folder / "forced.jsonl", forced), forced_cut),
            "marked": (write_pairs(folder / "marked.jsonl", marked), marked_cut)}


@torch.no_grad()
def response_logratios(policy, reference, pairs, pad_id: int, batch_size: int = 64) -> tuple[list, list]:
    """Per pair, the per-token log π − log π_ref over its chosen and over its rejected response."""
    chosen, rejected = [], []
    for start in range(0, len(pairs), batch_size):
        batch = collate_padded(pairs[start:start + batch_size], pad_id)
        per_token = _scored_logps(policy, batch) - _scored_logps(reference, batch)
        sequences: list[list[float]] = [[] for _ in range(2 * batch.num_pairs)]
        for seq, value in zip(batch.score_seq.tolist(), per_token.tolist(), strict=True):
            sequences[seq].append(value)
        chosen += sequences[:batch.num_pairs]
        rejected += sequences[batch.num_pairs:]
    return chosen, rejected


def _scored_logps(model, batch) -> torch.Tensor:
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return token_logps(logits[batch.score_rows, batch.score_cols], batch.targets)


def invented_eos_share(pairs, cut: list[tuple[bool, bool]], chosen_lr: list, rejected_lr: list, eos_id: int,
                       beta: float) -> dict:
    """Split the mean DPO margin β·(Σ chosen − Σ rejected log-ratios) into the part on invented EOS
    tokens - the final EOS of a response whose sample was cut off - and the rest."""
    margin = invented = 0.0
    invented_tokens = 0
    eos_logratios: dict[str, list[float]] = {"invented_chosen": [], "real_chosen": []}
    for pair, c, r in zip(pairs, chosen_lr, rejected_lr, strict=True):
        chosen_cut, rejected_cut = cut[pair.index - 1]  # index: the pair's line in its file
        margin += beta * (sum(c) - sum(r))
        for ids, was_cut, values, sign in ((pair.chosen_ids, chosen_cut, c, 1), (pair.rejected_ids, rejected_cut, r, -1)):
            ends_with_eos = ids[-1] == eos_id
            if was_cut and ends_with_eos:
                invented += sign * beta * values[-1]
                invented_tokens += 1
            if sign == 1 and ends_with_eos:
                eos_logratios["invented_chosen" if was_cut else "real_chosen"].append(values[-1])
    n = len(pairs)
    return {"pairs": n, "mean_margin": margin / n, "mean_margin_on_invented_eos": invented / n,
            "share_on_invented_eos": invented / margin if margin else 0.0, "invented_eos_tokens": invented_tokens,
            **{f"mean_logratio_{k}_eos": (sum(v) / len(v) if v else None) for k, v in eos_logratios.items()}}


def cut_figures(samples: SampleSet, cut: list[tuple[bool, bool]]) -> dict:
    flags = [done for per in samples.finished for done in per]
    return {"samples": len(flags), "samples_cut": sum(not f for f in flags) / len(flags), "pairs": len(cut),
            "pairs_chosen_cut": sum(c for c, _ in cut) / len(cut), "pairs_rejected_cut": sum(r for _, r in cut) / len(cut),
            "pairs_with_a_cut_response": sum(c or r for c, r in cut) / len(cut)}


def measure(s: DemoSettings, folder: Path, beta: float = 1.0, log=print) -> dict:
    base = str(base_model_dir())
    tokenizer, reference = load_tokenizer(base), load_policy(base, torch.device("cpu")).eval()
    prompts, samples = demo_samples(s, reference, tokenizer)
    results = {}
    for name, (path, cut) in pair_files(prompts, samples, s.pairing, folder).items():
        cfg = _run_config(s, base, path, folder / name, loss="sigmoid", beta=beta, steps=s.steps,
                          learning_rate=s.learning_rate, progress="off")
        train(cfg, log=lambda _: None)
        policy = load_policy(str(folder / name), torch.device("cpu")).eval()
        pairs = load_tokenized_pairs(str(path), PairTokenizer.from_config(tokenizer, cfg.data), lambda _: None, cfg.data)
        read = read_pairs(str(path), cfg.data)
        unfinished = sum(not (p.chosen_finished and p.rejected_finished) for p in read)
        chosen_lr, rejected_lr = response_logratios(policy, reference, pairs, tokenizer.pad_token_id)
        results[name] = {**cut_figures(samples, cut), "rows_marked_unfinished": unfinished,
                         **invented_eos_share(pairs, cut, chosen_lr, rejected_lr, tokenizer.eos_token_id, beta)}
        log(f"{name}: {json.dumps(results[name])}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=None, help="training prompts (default: the demo's)")
    parser.add_argument("--steps", type=int, default=None, help="DPO steps (default: the demo's)")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    s = replace(PRESETS["default"], **{k: v for k, v in (("train_prompts", args.prompts), ("steps", args.steps))
                                       if v is not None})
    with tempfile.TemporaryDirectory() as folder:
        results = measure(s, Path(folder))
    for name, r in results.items():
        print(f"{name:>6}: {r['samples_cut']:.1%} of {r['samples']} samples cut; {r['pairs']} pairs, "
              f"{r['pairs_chosen_cut']:.1%} with a cut chosen, {r['pairs_rejected_cut']:.1%} a cut rejected; "
              f"mean margin {r['mean_margin']:+.3f} nats, {r['mean_margin_on_invented_eos']:+.3f} on "
              f"{r['invented_eos_tokens']} invented EOS ({r['share_on_invented_eos']:.1%})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
