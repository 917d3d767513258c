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

import copy
import json
from collections.abc import Sequence
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
from dpokit.errors import DpokitError
from dpokit.eval.evaluate import Sampler, mean_and_stderr
from dpokit.experiments.frontier import CSV_FILE, PNG_FILE, FrontierRunner, prepare_root, refuse_push
from dpokit.io import Log, atomic_write_text, run_folder_lock
from dpokit.model.load import load_policy
from dpokit.paths import check_run_paths

# Seeds of the pair samples: far from the evaluation's sample seed, different in every round.
ROUND_SEED_STRIDE = 1000


def preference_pairs(prompts: Sequence, completions: Sequence[Sequence[str]], rewards: Sequence[Sequence[float]],
                     pairing: str = "best_worst", finished: Sequence[Sequence[bool]] | None = None
                     ) -> tuple[list[dict], dict]:
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
                rows.append(_pair_row(prompt, texts[better], texts[worse], scores[better], scores[worse], ends))
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


def sample_preference_pairs(model, prompts: Sequence, sampler: Sampler, *,
                            pairing: str = "best_worst") -> tuple[list[dict], dict]:
    """Sample `sampler.sampling.num_samples` completions per prompt from `model`, judge them, pair them.

    Returns the pair rows and stats: the mean judged reward of the samples (an on-policy measure
    of where the model is), the pair count and what was skipped.
    """
    samples = sampler.draw(model, prompts)
    rows, stats = preference_pairs(prompts, samples.texts, samples.rewards, pairing, samples.finished)
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
    The folder is locked for the command's life (one writer at a time).
    """
    refuse_push(base, "online")
    first_round = 2 if start_policy else 1
    if online.rounds < first_round or online.samples_per_prompt < 2:
        raise DpokitError(f"--rounds must be at least {first_round} and --samples-per-prompt at least 2 "
                          f"(got {online.rounds} and {online.samples_per_prompt})")
    validate_sampling(sampling)
    check_run_paths(base, [("--prompts", judging.prompts), ("--eval-prompts", online.eval_prompts),
                           ("--judge", judging.judge)])
    with run_folder_lock(base.train.output):
        root = prepare_root(base)
        if continuing is not None:
            runner = continuing.beside(root, progress=progress, log=log)
        else:
            runner = FrontierRunner.load(base, judging, sampling, root=root, prompts=list(eval_prompts or prompts),
                                         reference=base.model.reference_model or base.model.model,
                                         progress=progress, log=log)
        return _run_rounds(base, prompts, online, runner, start_policy=start_policy, first_round=first_round)


def _run_rounds(base: RunConfig, prompts: Sequence, online: OnlineConfig, runner: FrontierRunner, *,
                start_policy: str | None, first_round: int) -> dict:
    root, log, starting_model = runner.root, runner.log, base.model.model
    reference_name = base.model.reference_model or starting_model
    policy_name = start_policy or starting_model
    rounds: list[dict] = []
    (root / "pairs").mkdir(parents=True, exist_ok=True)
    for number in range(first_round, online.rounds + 1):
        log(f"--- online round {number}/{online.rounds}: sampling {online.samples_per_prompt} per prompt "
            f"from {policy_name}")
        pairs_file, stats = _round_pairs(base, prompts, online, runner, policy_name, number)
        cfg = copy.deepcopy(base)
        cfg.model.model, cfg.model.reference_model = policy_name, reference_name
        cfg.model.tokenizer = base.model.tokenizer or starting_model
        cfg.data.data = str(pairs_file)
        cfg.train.output = str(root / f"round-{number}")
        validate(cfg)
        done = runner.add_run(cfg, f"round-{number}", method="online DPO", beta=cfg.loss.beta,
                              label=f"round {number}")
        rounds.append({"round": number, "policy_sampled": policy_name, "pairs_file": str(pairs_file),
                       "pair_stats": stats, "point": done.row})
        policy_name = cfg.train.output
    summary = _summary(base, prompts, online, runner, rounds)
    runner.finish("online.json", summary, title=f"online DPO, reward–KL by round: {Path(starting_model).name}, "
                  f"judge {runner.sampler.judge_name}")
    log(f"wrote {root / 'online.json'}, {root / CSV_FILE} and {root / PNG_FILE}")
    return summary


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
    runner.log(f"round {number}: {stats['pairs']} pairs, {stats['pairs_with_cut_response']} holding a response "
               f"cut at --max-new-tokens (samples' mean reward {stats['sample_reward']:+.4f}; skipped {stats['skipped']})")
    return pairs_file, stats


def _summary(base: RunConfig, prompts: Sequence, online: OnlineConfig, runner: FrontierRunner,
             rounds: list[dict]) -> dict:
    return {"model": base.model.model, "reference": base.model.reference_model or base.model.model,
            "judge": runner.sampler.judging.judge, "samples_per_prompt": online.samples_per_prompt,
            "pairing": online.pairing, "prompts": len(prompts), "eval_prompts": len(runner.prompts),
            "rounds": rounds, "points": runner.points}
