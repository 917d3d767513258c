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
from pathlib import Path

from dpokit.config import JudgeConfig, RunConfig, SamplingConfig, validate, validate_sampling
from dpokit.errors import DpokitError
from dpokit.io import atomic_write_text

Log = Callable[[str], None]

CSV_FIELDS = ("run", "method", "beta", "reward", "reward_stderr", "kl", "kl_stderr", "win_rate",
              "win_rate_stderr", "eval_reward_accuracy", "eval_reward_margin")


def run_name(loss: str, beta: float) -> str:
    return f"{loss}-beta{beta:g}"


def _prepare_root(cfg: RunConfig) -> Path:
    root = Path(cfg.train.output)
    if root.exists() and not root.is_dir():
        raise DpokitError(f"--output {root} is a file, not a folder")
    if root.is_dir() and any(root.iterdir()) and not cfg.train.overwrite:
        raise DpokitError(f"--output {root} is not empty; choose a new folder or pass --overwrite")
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
    frontier.png and sweep.json.
    """
    from dpokit.evaluate import evaluate_on_prompts
    from dpokit.judges import load_judge
    from dpokit.models import load_policy, load_tokenizer, resolve_device
    from dpokit.report import plot_frontier, write_report
    from dpokit.sampling import read_prompts
    from dpokit.train.loop import train

    if not judging.prompts or not judging.judge:
        raise DpokitError("dpokit sweep needs --prompts and --judge to place each run on the frontier")
    if not betas or any(not b > 0 for b in betas):
        raise DpokitError(f"--beta: every β must be positive; got {list(betas)}")
    validate_sampling(sampling)
    configs = []
    for loss in losses:
        for beta in betas:
            cfg = copy.deepcopy(base)
            cfg.loss.loss, cfg.loss.beta = loss, float(beta)
            cfg.train.output = str(Path(base.train.output) / run_name(loss, beta))
            validate(cfg)  # every run's config is checked before the first one trains
            configs.append(cfg)
    prompts = read_prompts(judging.prompts, judging.max_prompts)
    root = _prepare_root(base)
    device = resolve_device(base.model.device)
    judge = load_judge(judging.judge, device=device, batch_size=judging.judge_batch_size)
    tokenizer = load_tokenizer(base.model.tokenizer or base.model.model, base.model.trust_remote_code)
    reference = load_policy(base.model.model, device, base.model.trust_remote_code).eval()
    reference_samples = None
    rows: list[dict] = []
    for cfg in configs:
        log(f"--- sweep: {cfg.loss.loss} at beta {cfg.loss.beta:g} -> {cfg.train.output}")
        result = train(cfg, log=log)
        policy = load_policy(cfg.train.output, device, base.model.trust_remote_code).eval()
        figures, reference_samples = evaluate_on_prompts(
            policy, reference, tokenizer, prompts, sampling, judge=judge, judge_name=judging.judge,
            judge_batch_size=judging.judge_batch_size, dtype=base.model.dtype,
            reference_samples=reference_samples, log=log)
        del policy
        atomic_write_text(Path(cfg.train.output) / "evaluation.json", json.dumps(figures, indent=1))
        write_report(cfg.train.output)
        judged, kl = figures["judged"], figures["kl"]
        rows.append({"run": run_name(cfg.loss.loss, cfg.loss.beta), "method": cfg.loss.loss, "beta": cfg.loss.beta,
                     "reward": judged["reward_policy"], "reward_stderr": judged["reward_policy_stderr"],
                     "kl": kl["kl"], "kl_stderr": kl["kl_stderr"], "win_rate": judged["win_rate"],
                     "win_rate_stderr": judged["win_rate_stderr"],
                     "eval_reward_accuracy": result.final_eval.get("eval_rewards/accuracies"),
                     "eval_reward_margin": result.final_eval.get("eval_rewards/margins")})
        log(f"beta {cfg.loss.beta:g}: judged reward {judged['reward_policy']:+.4f} (reference "
            f"{judged['reward_reference']:+.4f}), win rate {judged['win_rate']:.3f}, KL {kl['kl']:.4f} "
            f"± {kl['kl_stderr']:.4f}")
        reference_row = {"run": "reference", "method": "reference", "beta": None,
                         "reward": judged["reward_reference"], "reward_stderr": judged["reward_reference_stderr"],
                         "kl": 0.0, "kl_stderr": 0.0, "win_rate": 0.5}
        write_frontier_csv([reference_row, *rows], root / "frontier.csv")
    points = [reference_row, *rows]
    plot_frontier(points, root / "frontier.png",
                  title=f"reward–KL frontier: {Path(base.model.model).name}, judge {judging.judge}")
    summary = {"model": base.model.model, "judge": judging.judge, "prompts": len(prompts),
               "samples_per_prompt": sampling.num_samples, "points": points}
    atomic_write_text(root / "sweep.json", json.dumps(summary, indent=1))
    log(f"wrote {root / 'frontier.png'}, {root / 'frontier.csv'} and {root / 'sweep.json'}")
    return summary
