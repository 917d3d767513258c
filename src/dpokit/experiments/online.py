"""Online (iterative) DPO: rounds of sample -> judge -> pair -> train -> evaluate.

Each round samples K responses per prompt from the **current** policy, scores them with a judge,
pairs the best over the worst, and DPO-trains from the current policy with the reference fixed at
the starting model (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback";
Dong et al. 2024, "RLHF Workflow"). Round 1 is plain offline DPO on the starting model's samples.

Everything here is made of the shared pieces: `dpokit.eval.evaluate.Sampler` samples and judges,
and `dpokit.experiments.frontier.FrontierRunner` trains each round (`dpokit.train.loop.train`, with
`model.reference_model` naming the starting model) and places it on the reward–KL frontier.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import json
import signal
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from dpokit.config import (
    PAIRINGS,
    JudgeConfig,
    OnlineConfig,
    RunConfig,
    SamplingConfig,
    validate,
    validate_sampling,
)
from dpokit.data.sampled import SAMPLED_ID_FIELDS
from dpokit.errors import DpokitError, TrainingInterrupted
from dpokit.eval.evaluate import Sampler
from dpokit.eval.kl import mean_and_stderr
from dpokit.eval.sampling import Completion
from dpokit.experiments.frontier import (
    CSV_FILE,
    PNG_FILE,
    FrontierRunner,
    refuse_push,
    replace_root,
    write_frontier_csv,
)
from dpokit.experiments.online_progress import PROGRESS_FILE, OnlineProgress, online_settings
from dpokit.folder_swap import Replacement, locked_folder
from dpokit.io import FolderLock, Log, atomic_write_text, counted
from dpokit.model.load import load_policy
from dpokit.paths import check_run_paths

# Seeds of the pair samples: far from the evaluation's sample seed, different in every round.
ROUND_SEED_STRIDE = 1000


def preference_pairs(prompts: Sequence, completions: Sequence[Sequence[str]], rewards: Sequence[Sequence[float]],
                     pairing: str = "best_worst", finished: Sequence[Sequence[bool]] | None = None, *,
                     sampled: Sequence[Sequence[Completion]] | None = None) -> tuple[list[dict], dict]:
    """Pair higher-scored over lower-scored completions of each prompt.

    `best_worst`: one pair per prompt, its best completion over its worst (online DPO's rule).
    `all`: every two completions with different scores, the higher one chosen (K(K-1)/2 pairs at
    most). Ties and identical texts carry no preference and are skipped (counted in the stats).
    Rows are standard pairs (text prompts) or conversational ones (message-list prompts), with
    `score_chosen` / `score_rejected`.

    `finished` (per completion: did it end, or was it cut off by the token limit?) adds
    `chosen_finished` / `rejected_finished` to every row, so a cut response gets no EOS when
    tokenized, and the stats count the pairs that hold a cut response. `best_worst` then prefers
    finished completions: a prompt with at least two finished ones of different scores gets its one
    pair from those alone. `all` keeps every pair: its cut responses train without an EOS, and
    pairing among finished ones only cost the demo a third of its pairs and reward at every β.

    `sampled` (the completions themselves, whose texts are `completions`) adds the sampled token
    ids to every row (`prompt_ids`, `chosen_ids`, `rejected_ids`), so training uses exactly
    those, not the text tokenized again (`dpokit.data.sampled`).
    """
    if pairing not in PAIRINGS:
        raise DpokitError(f"--pairing must be one of {', '.join(PAIRINGS)}; got {pairing!r}")
    rows: list[dict] = []
    skipped = {"tied_scores": 0, "identical": 0}
    for number, (prompt, texts, scores) in enumerate(zip(prompts, completions, rewards, strict=True)):
        done = finished[number] if finished is not None else None
        pool = _pool(scores, done) if pairing == "best_worst" else range(len(texts))
        ranked = sorted(pool, key=lambda i: -scores[i])  # stable: ties keep sample order
        if pairing == "best_worst":
            candidates = [(ranked[0], ranked[-1])] if len(ranked) > 1 else []
        else:
            candidates = [(a, b) for n, a in enumerate(ranked) for b in ranked[n + 1:]]
        for better, worse in candidates:
            if scores[better] == scores[worse]:
                skipped["tied_scores"] += 1
            elif texts[better] == texts[worse]:
                skipped["identical"] += 1
            else:
                ends = None if done is None else (done[better], done[worse])
                row = _pair_row(prompt, texts[better], texts[worse], scores[better], scores[worse], ends)
                if sampled is not None:
                    row.update(_sampled_ids(sampled[number][better], sampled[number][worse]))
                rows.append(row)
    stats = {"pairs": len(rows), "skipped": skipped}
    if finished is not None:
        stats["pairs_with_cut_response"] = sum(not (r["chosen_finished"] and r["rejected_finished"]) for r in rows)
    return rows, stats


def _pool(scores: Sequence[float], finished: Sequence[bool] | None) -> list[int]:
    """The completions a prompt's best-over-worst pair is drawn from: its finished ones when at least
    two of them have different scores (both responses complete, judged whole), else all."""
    ended = [i for i in range(len(scores)) if finished is not None and finished[i]]
    return ended if len({scores[i] for i in ended}) > 1 else list(range(len(scores)))


def _pair_row(prompt, chosen: str, rejected: str, score_chosen: float, score_rejected: float,
              finished: tuple[bool, bool] | None = None) -> dict:
    if isinstance(prompt, list):  # chat prompt: the responses are the assistant's next turn
        chosen, rejected = [{"role": "assistant", "content": chosen}], [{"role": "assistant", "content": rejected}]
    row = {"prompt": prompt, "chosen": chosen, "rejected": rejected,
           "score_chosen": score_chosen, "score_rejected": score_rejected}
    if finished is not None:  # absent means finished (data/pairs.py)
        row["chosen_finished"], row["rejected_finished"] = finished
    return row


def _sampled_ids(chosen: Completion, rejected: Completion) -> dict[str, list[int]]:
    """A pair row's sampled ids (`dpokit.data.sampled.SAMPLED_ID_FIELDS`)."""
    ids = (list(chosen.prompt_ids), list(chosen.response_ids), list(rejected.response_ids))
    return dict(zip(SAMPLED_ID_FIELDS, ids, strict=True))


def sample_preference_pairs(model, prompts: Sequence, sampler: Sampler, *,
                            pairing: str = "best_worst") -> tuple[list[dict], dict]:
    """Sample `sampler.sampling.num_samples` completions per prompt from `model`, judge them, pair them.

    Returns the pair rows and stats: the mean judged reward of the samples (an on-policy measure
    of where the model is), the pair count and what was skipped.
    """
    samples = sampler.draw(model, prompts)
    rows, stats = preference_pairs(prompts, samples.texts, samples.rewards, pairing, samples.finished,
                                   sampled=samples.completions)
    mean, stderr = mean_and_stderr([r for per in samples.rewards for r in per])
    cut = sum(not done for per in samples.finished for done in per)
    return rows, {"prompts": len(prompts), "samples_per_prompt": sampler.sampling.num_samples,
                  "sample_reward": mean, "sample_reward_stderr": stderr, "samples_cut": cut, **stats}


def write_pairs(path: Path, rows: Sequence[dict]) -> Path:
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))
    return path


def run_online(base: RunConfig, prompts: Sequence, online: OnlineConfig, judging: JudgeConfig,
               sampling: SamplingConfig, *, eval_prompts: Sequence | None = None, progress: bool = False,
               log: Log = print, continuing: FrontierRunner | None = None, start_policy: str | None = None) -> dict:
    """Rounds of online DPO under `base.train.output`; returns online.json's content.

    `base.model.model` is the starting model: the reference of every round (unless
    `base.model.reference_model` names another) and the policy of round 1. Each round's pairs go
    to OUTPUT/pairs/round-N.jsonl and its model to OUTPUT/round-N/, with its evaluation.json;
    OUTPUT/online.json holds every round's figures: {"rounds": [...], "points": [reference row,
    round rows], ...}. `sampling` draws both the pair samples (K = `online.samples_per_prompt`, a
    fresh seed per round) and the evaluation's. A caller that already trained round 1 (the demo's
    offline run) passes its model as `start_policy` and its frontier as `continuing`: rounds then
    start at 2, judged with that frontier's judge, reference and samples.
    With `base.train.resume == "auto"`, an interrupted run in the folder continues where it stopped
    (OUTPUT/online_progress.json; see `dpokit.experiments.online_progress`).
    The folder is locked for the command's life (one writer at a time).
    """
    refuse_push(base, "online")
    first_round = 2 if start_policy else 1
    if online.rounds < first_round or online.samples_per_prompt < 2:
        raise DpokitError(f"--rounds must be at least {first_round} and --samples-per-prompt at least 2 "
                          f"(got {online.rounds} and {online.samples_per_prompt})")
    if base.train.resume not in (None, "none", "no", "auto"):
        raise DpokitError(f"--resume {base.train.resume}: dpokit online takes --resume auto (it continues the "
                          "run in --output; each round resumes from its own newest checkpoint)")
    validate_sampling(sampling)
    check_run_paths(base, [("--prompts", judging.prompts), ("--eval-prompts", online.eval_prompts),
                           ("--judge", judging.judge)])
    evaluation_prompts = list(eval_prompts or prompts)
    settings = online_settings(base, online, judging, sampling, prompts, evaluation_prompts)
    with locked_folder(base.train.output, log=log) as lock, _start_or_resume(base, online, settings, lock,
                                                                              log) as (replacing, done_so_far):
        root = Path(base.train.output)
        if continuing is not None:
            runner = continuing.beside(root, progress=progress, log=log)
        else:
            runner = FrontierRunner.load(base, judging, sampling, root=root, prompts=evaluation_prompts,
                                         reference=base.model.reference_model or base.model.model,
                                         progress=progress, log=log)
        runner.replacing = replacing
        # The demo (`continuing`) is not resumed: its own command has no --resume to point to.
        return _run_rounds(base, prompts, online, runner, done_so_far, start_policy=start_policy,
                           first_round=first_round, resumable=continuing is None)


@contextlib.contextmanager
def _start_or_resume(base: RunConfig, online: OnlineConfig, settings: dict, lock: FolderLock,
                     log: Log) -> Iterator[tuple[Replacement, OnlineProgress]]:
    """The interrupted run's progress (--resume auto), refused when a setting that changes its
    figures differs, in its own folder; or a new run's, in a folder that is new, empty, or replaced
    (--overwrite: what it held stays beside it until round 1's first checkpoint)."""
    root, resume = Path(base.train.output), base.train.resume == "auto"
    saved = OnlineProgress.read(root) if resume and root.is_dir() else None
    if saved is not None:
        saved.check_settings(settings)
        saved.check_rounds(online.rounds)
        yield Replacement(root, lock, replace=False), saved
        return
    refusal = (f"--resume auto: {{folder}} holds no online run to resume (no {PROGRESS_FILE}); pass {{overwrite}}, "
               "or choose a new folder" if resume else None)
    with replace_root(base, lock, log, refusal) as replacing:
        started = OnlineProgress(root, settings)
        started.save()
        yield replacing, started


def _run_rounds(base: RunConfig, prompts: Sequence, online: OnlineConfig, runner: FrontierRunner,
                progress: OnlineProgress, *, start_policy: str | None, first_round: int, resumable: bool) -> dict:
    root, log, starting_model = runner.root, runner.log, base.model.model
    policy_name = start_policy or starting_model
    rounds: list[dict] = []
    (root / "pairs").mkdir(parents=True, exist_ok=True)
    if runner.reference_row is None:  # the reference's row, as the finished rounds measured it
        runner.reference_row = progress.reference_point
    with _StopsCleanly(resumable) as where:
        for number in range(first_round, online.rounds + 1):
            where.round = number
            record = progress.finished(number)
            if record is not None:
                log(f"--- online round {number}/{online.rounds}: finished before the interruption; kept "
                    f"({record['pairs_file']}, {root / f'round-{number}'})")
                runner.rows.append(record["point"])
            else:
                record = _train_round(base, prompts, online, runner, progress, policy_name, number)
            rounds.append(record)
            policy_name = str(root / f"round-{number}")
        write_frontier_csv(runner.points, root / CSV_FILE)  # whole, even when no round was left to train
        summary = _summary(base, prompts, online, runner, rounds)
        runner.finish("online.json", summary, title=f"online DPO, reward–KL by round: {Path(starting_model).name}, "
                      f"judge {runner.sampler.judge_name}")
    log(f"wrote {root / 'online.json'}, {root / CSV_FILE} and {root / PNG_FILE}")
    return summary


def _train_round(base: RunConfig, prompts: Sequence, online: OnlineConfig, runner: FrontierRunner,
                 progress: OnlineProgress, policy_name: str, number: int) -> dict:
    """Round `number`: its pairs (those sampled before an interruption, or new ones), its training
    (resumed from its newest checkpoint, if any) and its evaluation; returns its online.json record."""
    record = progress.sampled_pairs(number)
    if record is not None and record["policy_sampled"] == policy_name:
        runner.log(f"--- online round {number}/{online.rounds}: reusing its {counted(record['pair_stats']['pairs'], 'pair')} "
                   f"sampled before the interruption ({record['pairs_file']})")
    else:
        runner.log(f"--- online round {number}/{online.rounds}: sampling {online.samples_per_prompt} per prompt "
                   f"from {policy_name}")
        pairs_file, stats = _round_pairs(base, prompts, online, runner, policy_name, number)
        record = {"round": number, "policy_sampled": policy_name, "pairs_file": str(pairs_file), "pair_stats": stats}
        progress.record_sampled(record)
    cfg = copy.deepcopy(base)
    cfg.model.model = policy_name
    cfg.model.reference_model = base.model.reference_model or base.model.model
    cfg.model.tokenizer = base.model.tokenizer or base.model.model
    cfg.data.data = record["pairs_file"]
    cfg.train.output = str(runner.root / f"round-{number}")
    # Resumed: the round continues from its newest checkpoint; a round folder without one (killed
    # before its first) is this run's own, and is started over.
    cfg.train.overwrite = base.train.overwrite or base.train.resume == "auto"
    validate(cfg)
    done = runner.add_run(cfg, f"round-{number}", method="online DPO", beta=cfg.loss.beta, label=f"round {number}")
    progress.record_finished(number, done.row, runner.reference_row)
    return {**record, "point": done.row}


class _Stopped(BaseException):
    """What the online signal handler raises: a BaseException, so that no `except Exception` on its
    way out (a report's guard around its plots, say) can swallow it; `_StopsCleanly` turns it into
    the one-line TrainingInterrupted."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _StopsCleanly:
    """Between and around the rounds' training steps (sampling, evaluation, saving), SIGINT or
    SIGTERM stop the run at once, and a full disk ends it, each with one line saying how to go on:
    every finished round and sampled pairs file is on disk already, written atomically. During
    training's steps, training's own handler stops after the step, with a checkpoint. Inactive
    when not `resumable`."""

    def __init__(self, resumable: bool) -> None:
        self.round, self.resumable = 0, resumable
        self._previous: dict[int, object] = {}

    def _stop(self, signum, frame) -> None:
        raise _Stopped(signum)

    def __enter__(self) -> _StopsCleanly:
        if self.resumable and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._stop)
        return self

    def __exit__(self, kind, exc, traceback) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if isinstance(exc, _Stopped):
            raise TrainingInterrupted(
                f"{signal.Signals(exc.signum).name} received: dpokit online stopped in round {self.round}; its "
                "finished rounds and sampled pairs are kept: run the same command with --resume auto to continue",
                exit_code=128 + exc.signum) from None
        if self.resumable and isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            where = f" writing {exc.filename}" if exc.filename else ""
            raise DpokitError(f"online round {self.round}: no space left on device{where}; the finished rounds are "
                              "kept: free some space, then run the same command with --resume auto") from None


def _round_pairs(base: RunConfig, prompts: Sequence, online: OnlineConfig, runner: FrontierRunner,
                 policy_name: str, number: int) -> tuple[Path, dict]:
    """Round `number`'s pairs, sampled from `policy_name` and judged: written to pairs/round-N.jsonl."""
    device = next(runner.reference.parameters()).device
    policy = load_policy(policy_name, device, base.model.trust_remote_code).eval()
    seed = runner.sampler.sampling.sample_seed + ROUND_SEED_STRIDE * number
    pair_sampler = runner.sampler.with_sampling(num_samples=online.samples_per_prompt, sample_seed=seed)
    rows, stats = sample_preference_pairs(policy, prompts, pair_sampler, pairing=online.pairing)
    del policy
    if not rows:
        raise DpokitError(f"online round {number}: every pair was a tie; nothing to train on "
                          "(raise --samples-per-prompt or --max-new-tokens)")
    pairs_file = write_pairs(runner.root / "pairs" / f"round-{number}.jsonl", rows)
    runner.log(f"round {number}: {counted(stats['pairs'], 'pair')}, {stats['pairs_with_cut_response']} holding a response "
               f"cut at --max-new-tokens (samples' mean reward {stats['sample_reward']:+.4f}; skipped {stats['skipped']})")
    return pairs_file, stats


def _summary(base: RunConfig, prompts: Sequence, online: OnlineConfig, runner: FrontierRunner,
             rounds: list[dict]) -> dict:
    return {"model": base.model.model, "reference": base.model.reference_model or base.model.model,
            "judge": runner.sampler.judging.judge, "samples_per_prompt": online.samples_per_prompt,
            "pairing": online.pairing, "prompts": len(prompts), "eval_prompts": len(runner.prompts),
            "rounds": rounds, "points": runner.points}
