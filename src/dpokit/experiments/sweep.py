"""β sweeps: train once per (loss, β), evaluate each run, draw the reward–KL frontier.

The DPO paper's Figure 2 for your own model and judge: each run is one point, its mean judged
reward against its KL to the reference. The reference model, its samples and their judged
rewards are computed once and shared by every run (all runs sample with the same seed): one
`dpokit.experiments.frontier.FrontierRunner` serves every run.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from dpokit.config import JudgeConfig, RunConfig, SamplingConfig, validate, validate_sampling
from dpokit.errors import DpokitError
from dpokit.eval.sampling import read_prompts
from dpokit.experiments.frontier import CSV_FILE, PNG_FILE, FrontierRunner, refuse_push, replace_root
from dpokit.folder_swap import Replacement, locked_folder
from dpokit.io import Log
from dpokit.paths import check_run_paths


def run_name(loss: str, beta: float) -> str:
    """Folder name of one run: a combined loss sigmoid,sft gives sigmoid+sft-beta0.1."""
    return f"{loss.replace(',', '+')}-beta{beta:g}"


def run_sweep(base: RunConfig, betas: Sequence[float], losses: Sequence[str], judging: JudgeConfig,
              sampling: SamplingConfig, log: Log = print) -> dict:
    """Train and evaluate every (loss, β) under `base.train.output`; returns the frontier rows.

    Writes, in that folder: one run folder per (loss, β) (with its evaluation.json and report),
    frontier.csv (rewritten after each run, so an interrupted sweep keeps what it finished),
    frontier.png and sweep.json. The runs share one reference cache (OUTPUT/reference-cache unless
    --reference-cache names one): the reference log-probs do not depend on β or the loss. The
    folder is locked for the sweep's life (one writer at a time); with --overwrite, what it held
    stays beside it until the first run's first checkpoint (frontier.replace_root).
    """
    if not judging.prompts or not judging.judge:
        raise DpokitError("dpokit sweep needs --prompts and --judge to place each run on the frontier")
    refuse_push(base, "sweep")
    check_run_paths(base, [("--prompts", judging.prompts), ("--judge", judging.judge)])
    if not betas or any(not b > 0 for b in betas):
        raise DpokitError(f"--beta: every β must be positive; got {list(betas)}")
    for flag, values in (("--beta", [f"{b:g}" for b in betas]), ("--loss", list(losses))):
        twice = sorted({v for v in values if values.count(v) > 1})
        if twice:  # two runs into one folder: the second would be refused after the first trained
            raise DpokitError(f"{flag}: {', '.join(twice)} given twice; list each value once")
    validate_sampling(sampling)
    configs = [_run_config(base, loss, beta) for loss in losses for beta in betas]
    with locked_folder(base.train.output, log=log) as lock, replace_root(base, lock, log) as replacing:
        return _sweep(base, configs, judging, sampling, replacing, log)


def _run_config(base: RunConfig, loss: str, beta: float) -> RunConfig:
    """One run's config, checked before the first run trains."""
    cfg = copy.deepcopy(base)
    cfg.loss = replace(cfg.loss, loss=loss, beta=float(beta))  # parses "sigmoid,sft"
    cfg.train.output = str(Path(base.train.output) / run_name(loss, beta))
    cfg.speed.reference_cache = base.speed.reference_cache or str(Path(base.train.output) / "reference-cache")
    validate(cfg)
    return cfg


def _sweep(base: RunConfig, configs: Sequence[RunConfig], judging: JudgeConfig, sampling: SamplingConfig,
           replacing: Replacement, log: Log) -> dict:
    prompts = read_prompts(judging.prompts, judging.max_prompts)
    root = replacing.folder
    # KL to the model every run starts from (a --reference-model only changes the runs' loss).
    runner = FrontierRunner.load(base, judging, sampling, root=root, prompts=prompts, reference=base.model.model,
                                 log=log)
    runner.replacing = replacing
    for cfg in configs:
        log(f"--- sweep: {cfg.loss.loss_spec} at beta {cfg.loss.beta:g} -> {cfg.train.output}")
        runner.add_run(cfg, run_name(cfg.loss.loss_spec, cfg.loss.beta), method=cfg.loss.loss_spec, beta=cfg.loss.beta)
    summary = {"model": base.model.model, "judge": judging.judge, "prompts": len(prompts),
               "samples_per_prompt": sampling.num_samples, "points": runner.points}
    runner.finish("sweep.json", summary,
                  title=f"reward–KL frontier: {Path(base.model.model).name}, judge {judging.judge}")
    log(f"wrote {root / PNG_FILE}, {root / CSV_FILE} and {root / 'sweep.json'}")
    return summary
