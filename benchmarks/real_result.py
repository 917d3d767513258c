"""A real DPO result on a laptop CPU: SmolLM2-135M-Instruct trained on UltraFeedback preference rows,
measured on rows it never saw.

    .venv/bin/python benchmarks/real_result.py --output real-result          # the full run (about 75 min on 2 idle cores)
    .venv/bin/python benchmarks/real_result.py --output /tmp/rr --smoke      # minutes: the pipeline only

Data (../shared/data/preferences, see its SOURCES.md; UltraFeedback, MIT):
- train and held-out: `ultrafeedback_trl_standard_train1000.jsonl` (trl-lib/ultrafeedback_binarized
  train), the rows dpokit keeps, split by prompt: a row is held out when the first 8 hex digits of
  sha256(its prompt, stripped and lower-cased) are 0 mod 10 (about 10%), so no prompt is on both
  sides (checked). Rows are written as one user message and one assistant reply, so the model's
  own ChatML template renders them, with their scores; tied scores are dropped (they state no
  preference) from training and from every evaluation set.
- other splits, never seen: `ultrafeedback_binarized_train_prefs_500.jsonl` (HuggingFaceH4's
  binarization) and `ultrafeedback_h4schema_reconstructed200.jsonl` (other trl-lib train rows),
  each without any row whose prompt is in the training or held-out set.

Training (`dpokit train`, every figure in the run folder): sigmoid DPO, β 0.1, full fine-tune
(135M parameters fit a laptop; LoRA with --lora-r is an option, see --help), 1 epoch, effective
batch 16 (4 x 4 accumulation), learning rate 5e-6 with 10% warm-up and cosine decay (the top of
the range published DPO recipes use for full fine-tunes, 5e-7 to 5e-6: one epoch is only 50
steps), max length 384 (prompt kept from its end; about an hour on 2 CPU cores), gradient
checkpointing (memory), fp32. benchmarks/RESULTS.md section 15 has the figures of these defaults.

Measured on each evaluation set, before (the base model, which is the reference) and after:
- the model's own preference: the fraction of pairs whose chosen reply it finds more likely than the
  rejected one, summed and per token, with the mean log-prob gap, each with its standard error;
- after only (before, policy = reference, every margin is 0): DPO's implicit-reward accuracy and
  margin β·[(π−ref)(chosen) − (π−ref)(rejected)], with standard errors;
- the KL paid, KL(π‖ref) from the trained policy's own samples on held-out prompts (`dpokit
  evaluate --prompts`), with its standard error; and greedy before/after replies to a few
  held-out prompts (`dpokit sample --temperature 0`).
Standard errors: s/√n over pairs (prompts for KL). Results go to OUTPUT/result.json and result.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_real import SHARED  # noqa: E402
from real_model import real_model_folder  # noqa: E402

TRAIN_FILE = "ultrafeedback_trl_standard_train1000.jsonl"
OTHER_FILES = {"H4 train_prefs (other binarization)": "ultrafeedback_binarized_train_prefs_500.jsonl",
               "trl-lib train, other rows": "ultrafeedback_h4schema_reconstructed200.jsonl"}
HELD_OUT = "held-out (same file, unseen prompts)"


# ----------------------------------------------------------------------------- data
def prompt_key(prompt) -> str:
    text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt if m["role"] == "user")
    return hashlib.sha256(text.strip().lower().encode()).hexdigest()


def single_turn(pair) -> dict | None:
    """The pair as one user message and one assistant reply each side, with its scores; None for a
    row that is not single-turn or whose scores tie."""
    prompt = [{"role": "user", "content": pair.prompt}] if isinstance(pair.prompt, str) else pair.prompt
    sides = []
    for side in (pair.chosen, pair.rejected):
        side = [{"role": "assistant", "content": side}] if isinstance(side, str) else side
        if len(side) != 1 or side[0]["role"] != "assistant":
            return None
        sides.append(side)
    if len(prompt) != 1 or prompt[0]["role"] != "user":
        return None
    scores = pair.scores
    if scores is not None and scores[0] == scores[1]:
        return None
    row = {"prompt": prompt, "chosen": sides[0], "rejected": sides[1]}
    if scores is not None:
        row.update(score_chosen=scores[0], score_rejected=scores[1])
    return row


def read_rows(path: Path) -> list[dict]:
    from dpokit.config import DataConfig
    from dpokit.data import read_pairs

    rows = []
    for pair in read_pairs(str(path), DataConfig()):
        row = single_turn(pair)
        if row is not None:
            rows.append(row)
    return rows


def split(shared: Path, folder: Path, limits: dict) -> dict[str, Path]:
    """Write train.jsonl and one file per evaluation set; returns {set name: file}."""
    rows = read_rows(shared / TRAIN_FILE)
    held = [r for r in rows if int(prompt_key(r["prompt"])[:8], 16) % 10 == 0]
    train = [r for r in rows if int(prompt_key(r["prompt"])[:8], 16) % 10 != 0]
    seen = {prompt_key(r["prompt"]) for r in train}
    assert not seen & {prompt_key(r["prompt"]) for r in held}, "a prompt on both sides"
    seen |= {prompt_key(r["prompt"]) for r in held}
    files = {"train": _write(folder / "train.jsonl", train[: limits.get("train")]),
             HELD_OUT: _write(folder / "heldout.jsonl", held[: limits.get("eval")])}
    for name, file in OTHER_FILES.items():
        other = [r for r in read_rows(shared / file) if prompt_key(r["prompt"]) not in seen]
        files[name] = _write(folder / f"other_{Path(file).stem}.jsonl", other[: limits.get("eval")])
    return files


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- figures
def pair_figures(policy, reference, tokenizer, data: Path, *, max_length: int, beta: float) -> dict:
    """Before/after preference figures with standard errors on one evaluation file."""
    import torch

    from dpokit.config import DataConfig
    from dpokit.data import PairTokenizer, load_tokenized_pairs
    from dpokit.data.batching import collate
    from dpokit.eval.kl import mean_and_stderr
    from dpokit.model.logprobs import sequence_logps

    config = DataConfig(data=str(data), max_length=max_length)
    pairs = load_tokenized_pairs(str(data), PairTokenizer.from_config(tokenizer, config), lambda line: None, config)
    sums = {"policy": [], "reference": []}
    with torch.no_grad():
        for start in range(0, len(pairs), 4):
            batch = collate(pairs[start:start + 4], tokenizer.pad_token_id, "padded")
            for name, model in (("policy", policy), ("reference", reference)):
                out = sequence_logps(model, batch, chunked_head=True)
                sums[name] += list(zip(out.chosen_logps.tolist(), out.rejected_logps.tolist(),
                                       out.chosen_lengths.tolist(), out.rejected_lengths.tolist(), strict=True))

    def own_preference(values) -> dict:
        gap = [c - r for c, r, _, _ in values]
        per_token = [c / nc - r / nr for c, r, nc, nr in values]
        figures = {}
        for name, series in (("prefers_chosen", [float(g > 0) for g in gap]),
                             ("prefers_chosen_per_token", [float(g > 0) for g in per_token]),
                             ("logp_gap", gap), ("logp_gap_per_token", per_token)):
            figures[name], figures[f"{name}_stderr"] = mean_and_stderr(series)
        return figures

    margins = [beta * ((pc - rc) - (pr - rr)) for (pc, pr, _, _), (rc, rr, _, _)
               in zip(sums["policy"], sums["reference"], strict=True)]
    implicit = {}
    for name, series in (("reward_accuracy", [float(m > 0) for m in margins]), ("reward_margin", margins)):
        implicit[name], implicit[f"{name}_stderr"] = mean_and_stderr(series)
    return {"pairs": len(pairs), "before": own_preference(sums["reference"]), "after": own_preference(sums["policy"]),
            "after_implicit_reward": implicit}


# ----------------------------------------------------------------------------- driver
def dpokit(*args: object) -> None:
    cmd = [sys.executable, "-m", "dpokit", *map(str, args)]
    print("$ " + " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="folder for the data splits, the run and the report")
    parser.add_argument("--shared", default=str(SHARED), help="the shared preference samples' folder")
    parser.add_argument("--smoke", action="store_true", help="16 train rows, 8 per evaluation set, 2 steps, length 128")
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--learning-rate", type=float, default=5e-6)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--lora-r", type=int, default=0, help="LoRA rank (0: full fine-tune); try 16 with lr 5e-5")
    parser.add_argument("--kl-prompts", type=int, default=32, help="held-out prompts sampled for the KL")
    parser.add_argument("--sample-prompts", type=int, default=3, help="held-out prompts shown before/after")
    parser.add_argument("--max-new-tokens", type=int, default=192)
    parser.add_argument("--skip-train", action="store_true",
                        help="measure the run already in OUTPUT/run (train with the same settings first)")
    parser.add_argument("--eval-pairs", type=int, default=0,
                        help="at most this many pairs per evaluation set (0: all of them)")
    parser.add_argument("--threads", type=int, default=0,
                        help="threads for every step (OMP_NUM_THREADS; 0: leave it as it is)")
    args = parser.parse_args()
    if args.threads:  # before torch loads, here and in the dpokit commands this runs
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    limits = {"train": 16, "eval": 8} if args.smoke else {}
    if args.eval_pairs:
        limits["eval"] = min(args.eval_pairs, limits.get("eval", args.eval_pairs))
    if args.smoke:
        args.max_length, args.kl_prompts, args.sample_prompts, args.max_new_tokens = 128, 2, 1, 16
    base = real_model_folder()
    files = split(Path(args.shared), out, limits)
    run = out / "run"
    train_args = ["train", "--model", base, "--data", files["train"], "--output", run, "--overwrite",
                  "--max-length", args.max_length, "--beta", args.beta, "--learning-rate", args.learning_rate,
                  "--batch-size", 4, "--gradient-accumulation-steps", 1 if args.smoke else 4,
                  "--warmup-ratio", 0.1, "--lr-scheduler", "cosine", "--gradient-checkpointing",
                  "--seed", 0, "--log-every", 1, "--progress", "off"]
    train_args += ["--max-steps", 2] if args.smoke else ["--epochs", args.epochs]
    if args.lora_r:
        train_args += ["--lora-r", args.lora_r, "--lora-alpha", 2 * args.lora_r]
    if args.skip_train:
        if not (run / "run_summary.json").is_file():
            parser.error(f"--skip-train: {run} holds no finished run (no run_summary.json)")
    else:
        dpokit(*train_args)
    report = {"settings": vars(args), "base": str(base), "files": {k: str(v) for k, v in files.items()},
              "sets": evaluate_sets(files, run, base, args)}
    report.update(kl_and_samples(files[HELD_OUT], run, base, out, args))
    (out / "result.json").write_text(json.dumps(report, indent=1))
    (out / "result.md").write_text(render(report))
    print(render(report))


def evaluate_sets(files: dict[str, Path], run: Path, base: Path, args) -> dict:
    import torch

    from dpokit.model.load import load_policy, load_tokenizer

    tokenizer = load_tokenizer(str(base))
    reference = load_policy(str(base), torch.device("cpu")).eval()
    policy = load_policy(str(run), torch.device("cpu")).eval()
    return {name: pair_figures(policy, reference, tokenizer, path, max_length=args.max_length, beta=args.beta)
            for name, path in files.items() if name != "train"}


def kl_and_samples(heldout: Path, run: Path, base: Path, out: Path, args) -> dict:
    prompts = out / "heldout_prompts.jsonl"
    rows = [json.loads(line) for line in heldout.read_text(encoding="utf-8").splitlines()]
    _write(prompts, [{"prompt": r["prompt"]} for r in rows[: max(args.kl_prompts, args.sample_prompts)]])
    dpokit("evaluate", "--model", run, "--reference-model", base, "--prompts", prompts, "--max-prompts",
           args.kl_prompts, "--max-new-tokens", args.max_new_tokens, "--sample-seed", 0, "--json",
           "--output", out / "kl.json", "--progress", "off")
    samples = {}
    for name, model in (("before", base), ("after", run)):
        dpokit("sample", "--model", model, "--prompts", prompts, "--max-prompts", args.sample_prompts,
               "--temperature", 0, "--max-new-tokens", args.max_new_tokens, "--output", out / f"greedy_{name}.jsonl",
               "--progress", "off")
        samples[name] = [json.loads(line) for line in (out / f"greedy_{name}.jsonl").read_text().splitlines()]
    return {"kl": json.loads((out / "kl.json").read_text()), "greedy_samples": samples}


def render(report: dict) -> str:
    lines = ["| evaluation set | pairs | prefers chosen, before → after | per token, before → after | "
             "implicit-reward accuracy after | reward margin after |", "|---|---|---|---|---|---|"]
    for name, f in report["sets"].items():
        b, a, r = f["before"], f["after"], f["after_implicit_reward"]
        lines.append(f"| {name} | {f['pairs']} | {_pm(b, 'prefers_chosen')} → {_pm(a, 'prefers_chosen')} | "
                     f"{_pm(b, 'prefers_chosen_per_token')} → {_pm(a, 'prefers_chosen_per_token')} | "
                     f"{_pm(r, 'reward_accuracy')} | {_pm(r, 'reward_margin', 4)} |")
    kl = _find(report.get("kl", {}), "kl")
    if kl is not None:
        lines.append(f"\nKL(π‖ref) from the policy's samples on held-out prompts: {kl['kl']:.3f} ± {kl['kl_stderr']:.3f} "
                     f"nats ({kl.get('sequences', '?')} samples)")
    for name, rows in report.get("greedy_samples", {}).items():
        for row in rows:
            lines.append(f"\n**{name}** (greedy): {row['completions'][0][:400]!r}")
    return "\n".join(lines) + "\n"


def _pm(figures: dict, key: str, digits: int = 3) -> str:
    return f"{figures[key]:.{digits}f} ± {figures[key + '_stderr']:.{digits}f}"


def _find(tree, key: str):
    """The dict holding `key` and `key_stderr` anywhere in `dpokit evaluate`'s JSON."""
    if isinstance(tree, dict):
        if key in tree and f"{key}_stderr" in tree:
            return tree
        for value in tree.values():
            found = _find(value, key)
            if found is not None:
                return found
    return None


if __name__ == "__main__":
    main()
