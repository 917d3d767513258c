"""`dpokit demo`: the DPO paper's controlled-sentiment experiment (its IMDb task) in miniature.

The policy is the bundled base model (`dpokit.experiments.demo.bundled`), pretrained on generated movie
reviews of every sentiment; prompts are neutral review openings; the ground-truth judge is VADER
sentiment. As in the paper (section 6.1): sample several completions per prompt from the base
model, score each with the judge, pair higher over lower; train DPO at a few β and the Preferred-FT
baseline (supervised fine-tuning on the chosen responses) from the same start; evaluate every run on
held-out prompts (mean judged reward, KL to the base model); draw the reward–KL frontier. With
online rounds, the DPO run at `online_beta` continues for more rounds of sampling from the current
policy (`dpokit.experiments.online`), on the same frontier.

Every piece is the library's own: sampling, judges, train, the FrontierRunner (the sweep's), online.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from dpokit.config import JudgeConfig, OnlineConfig, SamplingConfig, build_config
from dpokit.errors import DpokitError
from dpokit.eval.evaluate import Sampler
from dpokit.eval.judges import load_judge
from dpokit.experiments.demo.along_training import evaluate_along_training, point_of
from dpokit.experiments.demo.bundled import BASE_MODEL_DIR, base_model_dir
from dpokit.experiments.demo.checks import (
    DPO,
    ONLINE,
    PREFERRED_FT,
    describe_checks,
    final_points,
    format_demo_table,
    frontier_checks,
)
from dpokit.experiments.demo.corpus import review_openings
from dpokit.experiments.frontier import FrontierRunner
from dpokit.experiments.online import run_online, sample_preference_pairs, write_pairs
from dpokit.folder_swap import Replacement, held_entries, locked_folder
from dpokit.io import FolderLock, Log, atomic_write_text, shows_progress
from dpokit.model.load import load_policy, load_tokenizer
from dpokit.paths import check_creatable, check_outputs_apart, refuse_where_you_stand

REFERENCE_CACHE = "reference-cache"  # the offline runs' one cache of reference log-probs, in the output folder
DETAIL_LOG = "demo.log"  # the demo's first file in its folder: an earlier demo's folder holds it
# Everything the demo writes at the top of its folder. A folder holding demo.log and nothing but
# these is an earlier demo's: it is replaced whole, so no file of that run passes for one of the new run.
DEMO_ENTRIES = frozenset({DETAIL_LOG, "summary.json", "frontier.png", "pairs.jsonl", "prompts-train.jsonl",
                          "prompts-heldout.jsonl", "runs", "online", REFERENCE_CACHE})


@dataclass(frozen=True)
class DemoSettings:
    """Every knob of the demo; PRESETS below hold the measured choices."""

    train_prompts: int = 128
    eval_prompts: int = 64
    samples_per_prompt: int = 4  # completions sampled per training prompt to build the pairs
    pairing: str = "all"  # every two samples of a prompt with different scores (see dpokit.experiments.online)
    # Completions per held-out prompt for judged reward and KL, at every point (checkpoints along training
    # included): one sampling stream for all, so points differ by their models, not by their samples' luck.
    eval_samples: int = 2
    max_new_tokens: int = 32
    betas: tuple[float, ...] = (1.0, 0.3, 0.1)
    # As the paper trains (a small constant learning rate after a warm-up, evaluated along training):
    # small enough that each run's checkpoints trace its curve from low KL on, a point every ~0.3 nats
    # at β = 1 (7e-4 put DPO's first checkpoint at 4.4 nats). Measured: benchmarks/RESULTS.md section 8.
    steps: int = 60
    batch_size: int = 32
    learning_rate: float = 2e-4
    sft_steps: int = 60
    sft_learning_rate: float = 2e-4
    lr_scheduler: str = "constant"  # after the warm-up (a tenth of the steps)
    checkpoint_every: int = 10  # every run is also evaluated every N steps along its training (the paper's frontier)
    online_rounds: int = 3  # total rounds, the offline run at online_beta being round 1
    online_beta: float = 1.0  # the largest β: its rounds move in small steps, so they stay at comparable KL
    online_steps: int = 40  # optimizer steps per online round after the first
    seed: int = 0
    sample_batch_size: int = 128
    # Two threads: idle on 2 cores the demo took 1 min 54 s wall against 2 min 48 s on one thread (same
    # figures to the printed digits); where other jobs share the cores, one thread (`--threads 1`) is faster.
    threads: int = 2

    def describe(self) -> str:
        return (f"{self.train_prompts} training prompts x {self.samples_per_prompt} samples, "
                f"{self.eval_prompts} held-out prompts x {self.eval_samples} samples every {self.checkpoint_every} "
                "steps along training, "
                f"{self.max_new_tokens} new tokens, {self.steps} steps of {self.batch_size} pairs at lr "
                f"{self.learning_rate:g} ({self.lr_scheduler}), β {', '.join(f'{b:g}' for b in self.betas)}")


PRESETS = {
    "quick": DemoSettings(train_prompts=48, eval_prompts=24, samples_per_prompt=4, eval_samples=2,
                          max_new_tokens=24, betas=(0.3,), steps=15, sft_steps=15, online_rounds=2,
                          online_beta=0.3, online_steps=15, checkpoint_every=5),
    "default": DemoSettings(),
    "full": DemoSettings(train_prompts=256, eval_prompts=128, samples_per_prompt=6, eval_samples=4,
                         max_new_tokens=48, betas=(1.0, 0.5, 0.3, 0.1, 0.05), steps=150,
                         sft_steps=150, online_rounds=4, online_steps=150, checkpoint_every=30),
}


@dataclass
class DemoResult:
    output: Path
    summary: dict = field(default_factory=dict)


def _prompt_rows(prompts: list[str]) -> list[dict]:
    return [{"prompt": p} for p in prompts]


def _run_config(s: DemoSettings, model: str, pairs: Path, output: Path, *, loss: str, beta: float, steps: int,
                learning_rate: float, progress: str, reference_cache: Path | None = None, checkpoint_every: int = 0):
    return build_config({
        "model": {"model": model, "device": "cpu"},
        # One cache for every run from the base model: the reference log-probs depend on neither β nor the loss.
        "speed": {"reference_cache": str(reference_cache) if reference_cache else None},
        "data": {"data": str(pairs), "max_length": 2 * s.max_new_tokens + 16},
        "loss": {"loss": loss, "beta": beta},
        "train": {"output": str(output), "overwrite": True, "learning_rate": learning_rate,
                  "batch_size": s.batch_size, "max_steps": steps, "warmup_steps": max(1, steps // 10),
                  "lr_scheduler": s.lr_scheduler, "log_every": max(1, steps // 20), "seed": s.seed,
                  "progress": progress,
                  # A checkpoint every `checkpoint_every` steps, all kept, to be evaluated along training.
                  **({"save_every": checkpoint_every, "keep_checkpoints": steps // checkpoint_every + 1}
                     if checkpoint_every else {})},
    })


def run_demo(s: DemoSettings, output: str | Path = "demo-output", *, online: bool = True, progress: bool | None = None,
             log: Log = print) -> DemoResult:
    """Run the whole experiment into `output`; print the table; return the summary (summary.json).
    The folder is locked for the demo's life (one writer at a time)."""
    check_outputs_apart([("--output", output)], [("the bundled base model", BASE_MODEL_DIR)])
    check_creatable(output, "--output")
    with locked_folder(output, log=log) as lock, claim_demo_folder(lock, log) as replacing:
        callers_threads = torch.get_num_threads()
        torch.set_num_threads(s.threads)  # the demo's one thread setting (DemoSettings.threads)
        try:
            return _run_demo(s, output, online=online, progress=progress, log=log, replacing=replacing)
        finally:
            torch.set_num_threads(callers_threads)


def claim_demo_folder(lock: FolderLock, log: Log = print) -> Replacement:
    """The demo writes into a new or empty folder (locked), or replaces an earlier demo's (with one
    line saying so; the earlier one stays beside it until the new demo's first run has a checkpoint,
    folder_swap); any other folder that holds something is refused, untouched."""
    folder = lock.folder
    entries = held_entries(folder)
    earlier = (folder / DETAIL_LOG).is_file() and all(_written_by_the_demo(entry) for entry in entries)
    if entries and not earlier:
        raise DpokitError(f"--output {folder} is not empty; the demo writes into a new folder, an empty one or an "
                          "earlier demo's (with its demo.log and nothing else); choose another --output")
    if earlier:
        refuse_where_you_stand(folder)
    replacing = Replacement.at_once(folder, lock, log)
    if earlier:
        log(f"replacing {folder}: it held an earlier dpokit demo run, which is kept beside it until this demo's "
            "first run has a checkpoint")
    return replacing


def _written_by_the_demo(entry: Path) -> bool:
    name = entry.name
    if name.startswith(".") and name.endswith(".tmp"):  # a write cut short: .NAME.RANDOM.tmp (io.atomic_write_bytes)
        name = name[1:].rsplit(".", 2)[0]
    return name in DEMO_ENTRIES


def _run_demo(s: DemoSettings, output: str | Path, *, online: bool, progress: bool | None, log: Log,
              replacing: Replacement | None = None) -> DemoResult:
    started = time.perf_counter()
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    show = shows_progress("auto") if progress is None else progress
    with _DetailLog(out / DETAIL_LOG, started) as quiet:
        base = str(base_model_dir())  # checked against its manifest
        runner, train_prompts = _demo_frontier(s, base, out, quiet)
        runner.replacing = replacing  # an earlier demo's folder is replaced at the first run's checkpoint
        log(f"dpokit demo: DPO on the bundled {sum(p.numel() for p in runner.reference.parameters()) / 1e6:.2f}"
            "M-parameter review model; the judge is VADER sentiment")
        log(f"settings: {s.describe()}")
        pairs_file, pair_stats = _demo_pairs(s, runner, train_prompts, out, show, log)
        points, examples = _offline_runs(s, runner, base, pairs_file, show, log)
        online_summary = None
        if online and s.online_rounds >= 2:
            online_summary = _online_rounds(s, runner, base, pairs_file, train_prompts, points, show, log)
        else:
            log("[3/4] online rounds skipped")

        # 4. Table, frontier, summary.json.
        log("[4/4] writing the frontier, the table and summary.json")
        reference_row = runner.reference_row
        base_reward = reference_row["reward"]
        for point in points:
            point["base_reward"] = base_reward
        base_per_prompt = [sum(r) / len(r) for r in runner.reference_samples.rewards]
        checks = frontier_checks(points, base_reward, base_per_prompt)
    elapsed = time.perf_counter() - started
    # The figures per held-out prompt, apart from the runs' rows (which stay readable): the
    # frontiers' comparison and its standard error can be recomputed from summary.json.
    per_prompt = {"base_reward": base_per_prompt,
                  "runs": {p["run"]: figures for p in points if (figures := p.pop("per_prompt", None))}}
    summary = {"settings": asdict(s), "judge": "sentiment (VADER compound, [-1, 1])", "base_model": base,
               "base_reward": base_reward, "base_reward_stderr": reference_row["reward_stderr"],
               "pairs": pair_stats, "runs": points, "checks": checks, "examples": examples,
               "online": online_summary, "per_prompt": per_prompt, "seconds": round(elapsed, 1)}
    # Each method's frontier: the upper envelope of its points (checkpoints included) from the base model.
    runner.finish("summary.json", summary, points=[reference_row, *points], envelopes=(DPO, PREFERRED_FT),
                  title="dpokit demo: reward–KL frontier on held-out review openings")
    _print_outcome(points, base_reward, examples, checks, log)
    log(f"\nwrote {out}/: frontier.png, summary.json, pairs.jsonl, runs/*/ (trained models, training_curves.png, "
        f"report.md){', online/' if online_summary else ''}, {REFERENCE_CACHE}/; details in {DETAIL_LOG}. "
        f"Took {elapsed:.0f} s.")
    return DemoResult(out, summary)


class _DetailLog:
    """The library's step-by-step lines go to demo.log, not the screen, each with its wall and CPU time."""

    def __init__(self, path: Path, started: float):
        self.path, self.started = path, started

    def __enter__(self) -> Log:
        self.handle = self.path.open("w", encoding="utf-8")
        return self.write

    def write(self, line: str) -> None:
        self.handle.write(f"[{time.perf_counter() - self.started:7.1f} s, cpu {time.process_time():7.1f} s] {line}\n")
        self.handle.flush()

    def __exit__(self, *exc) -> None:
        self.handle.close()


def _demo_frontier(s: DemoSettings, base: str, out: Path, quiet: Log) -> tuple[FrontierRunner, list[str]]:
    """The judge, the base model as reference, the held-out prompts and the evaluation sampling;
    returns that frontier and the training prompts (both prompt sets are written to `out`)."""
    tokenizer = load_tokenizer(base)
    reference = load_policy(base, torch.device("cpu")).eval()
    judging = JudgeConfig(judge="sentiment", judge_batch_size=256)
    judge = load_judge("sentiment")
    train_prompts = review_openings(s.train_prompts, seed=s.seed, held_out=False)
    eval_prompts = review_openings(s.eval_prompts, seed=s.seed + 1, held_out=True)
    atomic_write_text(out / "prompts-train.jsonl", "".join(json.dumps(r) + "\n" for r in _prompt_rows(train_prompts)))
    atomic_write_text(out / "prompts-heldout.jsonl", "".join(json.dumps(r) + "\n" for r in _prompt_rows(eval_prompts)))
    eval_sampling = SamplingConfig(num_samples=s.eval_samples, max_new_tokens=s.max_new_tokens, sample_seed=s.seed,
                                   sample_batch_size=s.sample_batch_size)
    sampler = Sampler(tokenizer, eval_sampling, judge=judge, judging=judging)
    # The demo's frontier has no CSV: summary.json holds every figure.
    return FrontierRunner(out, reference=reference, prompts=eval_prompts, sampler=sampler, write_csv=False,
                          log=quiet), train_prompts


def _demo_pairs(s: DemoSettings, runner: FrontierRunner, train_prompts: list[str], out: Path, show: bool,
                log: Log) -> tuple[Path, dict]:
    """1. Preference pairs the paper's way: sample from the base model, judge, pair higher over lower."""
    log(f"[1/4] sampling {s.samples_per_prompt} completions for each of {len(train_prompts)} training prompts "
        "and judging them")
    sampler = replace(runner.sampler.with_sampling(num_samples=s.samples_per_prompt, sample_seed=s.seed + 1000),
                      progress=show)
    rows, pair_stats = sample_preference_pairs(runner.reference, train_prompts, sampler, pairing=s.pairing)
    pairs_file = write_pairs(out / "pairs.jsonl", rows)
    log(f"      {pair_stats['pairs']} pairs (ties skipped: {pair_stats['skipped']['tied_scores']}; "
        f"{pair_stats['pairs_with_cut_response']} hold a response cut at {s.max_new_tokens} tokens, which gets no "
        f"EOS); base samples' mean reward {pair_stats['sample_reward']:+.3f}")
    return pairs_file, pair_stats


def _offline_runs(s: DemoSettings, runner: FrontierRunner, base: str, pairs_file: Path, show: bool,
                  log: Log) -> tuple[list[dict], dict]:
    """2-3. Train each run from the base model; evaluate it on the held-out prompts at checkpoints
    along its training and at its end."""
    specs = [(DPO, "sigmoid", beta, s.steps, s.learning_rate, f"dpo-beta{beta:g}") for beta in s.betas]
    specs.append((PREFERRED_FT, "sft", 0.1, s.sft_steps, s.sft_learning_rate, "preferred-ft"))
    log(f"[2/4] training {len(specs)} runs ({len(s.betas)} DPO β, Preferred-FT) and evaluating each on "
        f"{len(runner.prompts)} held-out prompts x {s.eval_samples} samples every {s.checkpoint_every} steps")
    points: list[dict] = []
    examples: dict = {}
    for method, loss, beta, steps, lr, name in specs:
        cfg = _run_config(s, base, pairs_file, runner.root / "runs" / name, loss=loss, beta=beta, steps=steps,
                          learning_rate=lr, progress="on" if show else "off",
                          reference_cache=runner.root / REFERENCE_CACHE, checkpoint_every=s.checkpoint_every)
        beta_shown = beta if method == DPO else None
        done = runner.add_run(cfg, name, method=method, beta=beta_shown, learning_rate=lr)
        final = point_of(done, name, steps, final=True)
        final["label"] = f"β={beta:g}" if method == DPO else f"{steps} steps"
        along_training = evaluate_along_training(runner, base, cfg.train.output, name, method, beta_shown)
        for point in along_training:
            point.update(learning_rate=lr, label="")
        points += [*along_training, final]
        examples[name] = done.figures["examples"]
        earlier = f" (and at steps {', '.join(str(p['step']) for p in along_training)})" if along_training else ""
        log(f"      {name:<14} reward {final['reward']:+.3f}  KL {final['kl']:6.2f} nats  win rate "
            f"{final['win_rate']:.2f} after {steps} steps{earlier}")
    return points, examples


def _online_rounds(s: DemoSettings, runner: FrontierRunner, base: str, pairs_file: Path, train_prompts: list[str],
                   points: list[dict], show: bool, log: Log) -> dict:
    """4. Online rounds: the DPO run at online_beta is round 1; later rounds sample from the current policy."""
    if s.online_beta not in s.betas:
        raise DpokitError(f"demo settings: online_beta {s.online_beta} must be one of the DPO β {s.betas}")
    log(f"[3/4] online DPO at β {s.online_beta:g}: rounds 2-{s.online_rounds}, each sampling "
        f"{s.samples_per_prompt} completions per training prompt from the current policy")
    first = next(p for p in final_points(points, DPO) if p["beta"] == s.online_beta)
    base_cfg = _run_config(s, base, pairs_file, runner.root / "online", loss="sigmoid", beta=s.online_beta,
                           steps=s.online_steps, learning_rate=s.learning_rate, progress="on" if show else "off")
    online_cfg = OnlineConfig(rounds=s.online_rounds, samples_per_prompt=s.samples_per_prompt, pairing=s.pairing)
    summary = run_online(base_cfg, train_prompts, online_cfg, runner.sampler.judging, runner.sampler.sampling,
                         eval_prompts=runner.prompts, progress=show, log=runner.log, continuing=runner,
                         start_policy=str(runner.root / "runs" / first["run"]))
    # Round 1 is the DPO run itself: the same point, labelled once in the picture, saying so.
    first["label"] = f"β={first['beta']:g} = online round 1"
    points.append({**first, "run": "online-round-1", "method": ONLINE, "label": "", "per_prompt": None})
    for r in summary["rounds"]:
        point = {**r["point"], "run": f"online-round-{r['round']}", "method": ONLINE,
                 "steps": s.online_steps, "learning_rate": s.learning_rate}
        points.append(point)
        log(f"      round {r['round']} ({r['pair_stats']['pairs']} pairs, samples' reward "
            f"{r['pair_stats']['sample_reward']:+.3f})  reward {point['reward']:+.3f}  KL {point['kl']:6.2f} "
            f"nats  win rate {point['win_rate']:.2f}")
    return summary


def _print_outcome(points: list[dict], base_reward: float, examples: dict, checks: dict, log: Log) -> None:
    log("")
    log(format_demo_table(points, base_reward))
    log("")
    _print_examples(examples, points, log)
    log("")
    for line in describe_checks(checks):
        log(line)


def _print_examples(examples: dict, points: list[dict], log: Log, count: int = 3) -> None:
    dpo = final_points(points, DPO)
    if not dpo:
        return
    best = max(dpo, key=lambda p: p["reward"])
    log(f"before (base model) / after ({best['run']}) on held-out prompts, same sampling seed:")
    for row in examples[best["run"]][:count]:
        log(f"  {row['prompt']!r}")
        log(f"    before [{row['reference_reward']:+.2f}] {row['reference'].strip()[:110]!r}")
        log(f"    after  [{row['policy_reward']:+.2f}] {row['policy'].strip()[:110]!r}")


def settings_for(preset: str, **overrides) -> DemoSettings:
    if preset not in PRESETS:
        raise DpokitError(f"unknown demo preset {preset!r}: use one of {', '.join(PRESETS)}")
    return replace(copy.deepcopy(PRESETS[preset]), **{k: v for k, v in overrides.items() if v is not None})
