"""β sweeps: train once per (loss, β), evaluate each run, draw the reward–KL frontier.

The DPO paper's Figure 2 for your own model and judge: each run is one point, its mean judged
reward against its KL to the reference. The reference model, its samples and their judged
rewards are computed once and shared by every run (all runs sample with the same seed).
"""

from __future__ import annotations

import copy
import csv
import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from dpokit.config import JudgeConfig, RunConfig, SamplingConfig, validate, validate_sampling
from dpokit.errors import DpokitError
from dpokit.io import atomic_write_text, folder_entries, run_folder_lock
from dpokit.paths import check_run_paths, clear_for_overwrite

Log = Callable[[str], None]

CSV_FIELDS = ("run", "method", "beta", "reward", "reward_stderr", "kl", "kl_stderr", "win_rate",
              "win_rate_stderr", "eval_reward_accuracy", "eval_reward_margin")


def run_name(loss: str, beta: float) -> str:
    """Folder name of one run: a combined loss sigmoid,sft gives sigmoid+sft-beta0.1."""
    return f"{loss.replace(',', '+')}-beta{beta:g}"


def prepare_root(cfg: RunConfig) -> Path:
    root = Path(cfg.train.output)
    if root.exists() and not root.is_dir():
        raise DpokitError(f"--output {root} is a file, not a folder")
    if root.is_dir() and folder_entries(root) and not cfg.train.overwrite:
        raise DpokitError(f"--output {root} is not empty; choose a new folder or pass --overwrite")
    if cfg.train.overwrite:
        clear_for_overwrite(root)  # nothing of the previous sweep may survive beside the new one
    root.mkdir(parents=True, exist_ok=True)
    return root


def write_frontier_csv(rows: Sequence[dict], path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def run_sweep(base: RunConfig, betas: Sequence[float], losses: Sequence[str], judging: JudgeConfig,
              sampling: SamplingConfig, log: Log = print) -> dict:
    """Train and evaluate every (loss, β) under `base.train.output`; returns the frontier rows.

    Writes, in that folder: one run folder per (loss, β) (with its evaluation.json and report),
    frontier.csv (rewritten after each run, so an interrupted sweep keeps what it finished),
    frontier.png and sweep.json. The runs share one reference cache (OUTPUT/reference-cache unless
    --reference-cache names one): the reference log-probs do not depend on β or the loss. The
    folder is locked for the sweep's life (one writer at a time).
    """
    if not judging.prompts or not judging.judge:
        raise DpokitError("dpokit sweep needs --prompts and --judge to place each run on the frontier")
    check_run_paths(base, [("--prompts", judging.prompts), ("--judge", judging.judge)])
    if not betas or any(not b > 0 for b in betas):
        raise DpokitError(f"--beta: every β must be positive; got {list(betas)}")
    for flag, values in (("--beta", [f"{b:g}" for b in betas]), ("--loss", list(losses))):
        twice = sorted({v for v in values if values.count(v) > 1})
        if twice:  # two runs into one folder: the second would be refused after the first trained
            raise DpokitError(f"{flag}: {', '.join(twice)} given twice; list each value once")
    validate_sampling(sampling)
    configs = []
    for loss in losses:
        for beta in betas:
            cfg = copy.deepcopy(base)
            cfg.loss = replace(cfg.loss, loss=loss, beta=float(beta))  # parses "sigmoid,sft"
            cfg.train.output = str(Path(base.train.output) / run_name(loss, beta))
            cfg.speed.reference_cache = base.speed.reference_cache or str(Path(base.train.output) / "reference-cache")
            validate(cfg)  # every run's config is checked before the first one trains
            configs.append(cfg)
    with run_folder_lock(base.train.output):
        return _sweep(base, configs, judging, sampling, log)


def _sweep(base: RunConfig, configs: Sequence[RunConfig], judging: JudgeConfig, sampling: SamplingConfig,
           log: Log) -> dict:
    from dpokit.eval.judges import load_judge
    from dpokit.eval.report import plot_frontier
    from dpokit.eval.sampling import read_prompts
    from dpokit.model.load import load_policy, load_tokenizer, resolve_device
    from dpokit.train.loop import train

    prompts = read_prompts(judging.prompts, judging.max_prompts)
    root = prepare_root(base)
    device = resolve_device(base.model.device)
    judge = load_judge(judging.judge, device=device, batch_size=judging.judge_batch_size)
    tokenizer = load_tokenizer(base.model.tokenizer or base.model.model, base.model.trust_remote_code)
    reference = load_policy(base.model.model, device, base.model.trust_remote_code).eval()
    reference_samples = None
    rows: list[dict] = []
    for cfg in configs:
        log(f"--- sweep: {cfg.loss.loss_spec} at beta {cfg.loss.beta:g} -> {cfg.train.output}")
        result = train(cfg, log=log)
        done = evaluate_run(
            cfg.train.output, run_name(cfg.loss.loss_spec, cfg.loss.beta), cfg.loss.loss_spec, cfg.loss.beta,
            reference=reference, tokenizer=tokenizer, prompts=prompts, sampling=sampling, judge=judge,
            judging=judging, dtype=base.model.dtype, reference_samples=reference_samples,
            final_eval=result.final_eval, trust_remote_code=base.model.trust_remote_code, log=log)
        reference_samples = done.reference_samples
        rows.append(done.row)
        write_frontier_csv([done.reference_row, *rows], root / "frontier.csv")
    points = [done.reference_row, *rows]
    plot_frontier(points, root / "frontier.png",
                  title=f"reward–KL frontier: {Path(base.model.model).name}, judge {judging.judge}")
    summary = {"model": base.model.model, "judge": judging.judge, "prompts": len(prompts),
               "samples_per_prompt": sampling.num_samples, "points": points}
    atomic_write_text(root / "sweep.json", json.dumps(summary, indent=1))
    log(f"wrote {root / 'frontier.png'}, {root / 'frontier.csv'} and {root / 'sweep.json'}")
    return summary


@dataclass
class RunEvaluation:
    row: dict  # the run's frontier row (CSV_FIELDS)
    reference_row: dict  # the reference's row: its reward, at KL 0
    reference_samples: Any  # dpokit.eval.evaluate.SampleSet, reused by the next run
    figures: dict  # everything evaluate_on_prompts measured (evaluation.json)


def evaluate_run(run_dir: str | Path, run: str, method: str, beta: float | None, *, reference, tokenizer,
                 prompts: Sequence, sampling: SamplingConfig, judge, judging: JudgeConfig, dtype: str = "fp32",
                 reference_samples=None, final_eval: dict | None = None, trust_remote_code: bool = False,
                 progress: bool = False, log: Log = print) -> RunEvaluation:
    """Evaluate one trained run folder on `prompts` against `reference`: its frontier row.

    Writes the run's evaluation.json and report. Pass the returned `reference_samples` to the next
    call: every run is compared with the same reference samples and scores (same seed, same prompts).
    """
    from dpokit.eval.evaluate import evaluate_on_prompts
    from dpokit.eval.report import write_report
    from dpokit.model.load import load_policy

    device = next(reference.parameters()).device
    policy = load_policy(str(run_dir), device, trust_remote_code).eval()
    figures, reference_samples = evaluate_on_prompts(
        policy, reference, tokenizer, prompts, sampling, judge=judge, judge_name=judging.judge,
        judge_batch_size=judging.judge_batch_size, dtype=dtype, reference_samples=reference_samples,
        progress=progress, log=log)
    del policy
    atomic_write_text(Path(run_dir) / "evaluation.json", json.dumps(figures, indent=1))
    write_report(run_dir)
    judged, kl = figures["judged"], figures["kl"]
    final_eval = final_eval or {}
    row = {"run": run, "method": method, "beta": beta,
           "reward": judged["reward_policy"], "reward_stderr": judged["reward_policy_stderr"],
           "kl": kl["kl"], "kl_stderr": kl["kl_stderr"], "win_rate": judged["win_rate"],
           "win_rate_stderr": judged["win_rate_stderr"],
           "eval_reward_accuracy": final_eval.get("eval_rewards/accuracies"),
           "eval_reward_margin": final_eval.get("eval_rewards/margins")}
    log(f"{run}: judged reward {judged['reward_policy']:+.4f} (reference {judged['reward_reference']:+.4f}), "
        f"win rate {judged['win_rate']:.3f}, KL {kl['kl']:.4f} ± {kl['kl_stderr']:.4f}")
    reference_row = {"run": "reference", "method": "reference", "beta": None,
                     "reward": judged["reward_reference"], "reward_stderr": judged["reward_reference_stderr"],
                     "kl": 0.0, "kl_stderr": 0.0, "win_rate": 0.5}
    return RunEvaluation(row, reference_row, reference_samples, figures)
