"""Online (iterative) DPO: rounds of sample -> judge -> pair -> train -> evaluate.

Each round samples K responses per prompt from the **current** policy, scores them with a judge,
pairs the best over the worst, and DPO-trains from the current policy with the reference fixed at
the starting model (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback";
Dong et al. 2024, "RLHF Workflow"). Round 1 is plain offline DPO on the starting model's samples.

Everything here is made of the shared pieces: `dpokit.eval.evaluate.draw_samples` samples and judges,
`dpokit.train.loop.train` trains (with `model.reference_model` naming the starting model), and
`dpokit.experiments.sweep.evaluate_run` places each round on the reward–KL frontier.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Sequence
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
from dpokit.io import atomic_write_text, run_folder_lock
from dpokit.paths import check_run_paths

Log = Callable[[str], None]

# Seeds of the pair samples: far from the evaluation's sample seed, different in every round.
ROUND_SEED_STRIDE = 1000


def preference_pairs(prompts: Sequence, completions: Sequence[Sequence[str]], rewards: Sequence[Sequence[float]],
                     pairing: str = "best_worst") -> tuple[list[dict], dict]:
    """Pair higher-scored over lower-scored completions of each prompt.

    `best_worst`: one pair per prompt, its best completion over its worst (online DPO's rule).
    `all`: every two completions with different scores, the higher one chosen (K(K-1)/2 pairs at
    most). Ties and identical texts carry no preference and are skipped (counted in the stats).
    Rows are standard pairs (text prompts) or conversational ones (message-list prompts), with
    `score_chosen` / `score_rejected`.
    """
    if pairing not in PAIRINGS:
        raise DpokitError(f"--pairing must be one of {', '.join(PAIRINGS)}; got {pairing!r}")
    rows: list[dict] = []
    skipped = {"tied_scores": 0, "identical": 0}
    for prompt, texts, scores in zip(prompts, completions, rewards, strict=True):
        ranked = sorted(range(len(texts)), key=lambda i: -scores[i])  # stable: ties keep sample order
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
                rows.append(_pair_row(prompt, texts[better], texts[worse], scores[better], scores[worse]))
    return rows, {"pairs": len(rows), "skipped": skipped}


def _pair_row(prompt, chosen: str, rejected: str, score_chosen: float, score_rejected: float) -> dict:
    if isinstance(prompt, list):  # chat prompt: the responses are the assistant's next turn
        chosen_turn = [{"role": "assistant", "content": chosen}]
        rejected_turn = [{"role": "assistant", "content": rejected}]
        return {"prompt": prompt, "chosen": chosen_turn, "rejected": rejected_turn,
                "score_chosen": score_chosen, "score_rejected": score_rejected}
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected,
            "score_chosen": score_chosen, "score_rejected": score_rejected}


def sample_preference_pairs(model, tokenizer, prompts: Sequence, judge, sampling: SamplingConfig, *,
                            pairing: str = "best_worst", judge_name: str = "judge", judge_batch_size: int = 16,
                            dtype: str = "fp32", progress: bool = False) -> tuple[list[dict], dict]:
    """Sample `sampling.num_samples` completions per prompt from `model`, judge them, pair them.

    Returns the pair rows and stats: the mean judged reward of the samples (an on-policy measure
    of where the model is), the pair count and what was skipped.
    """
    from dpokit.eval.evaluate import draw_samples, mean_and_stderr

    samples = draw_samples(model, tokenizer, prompts, sampling, dtype=dtype, judge=judge, judge_name=judge_name,
                           judge_batch_size=judge_batch_size, progress=progress)
    rows, stats = preference_pairs(prompts, samples.texts, samples.rewards, pairing)
    mean, stderr = mean_and_stderr([r for per in samples.rewards for r in per])
    return rows, {"prompts": len(prompts), "samples_per_prompt": sampling.num_samples, "sample_reward": mean,
                  "sample_reward_stderr": stderr, **stats}


def write_pairs(path: Path, rows: Sequence[dict]) -> Path:
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))
    return path


def run_online(base: RunConfig, prompts: Sequence, online: OnlineConfig, judging: JudgeConfig,
               sampling: SamplingConfig, *, eval_prompts: Sequence | None = None, judge=None,
               start_policy: str | None = None, first_round: int = 1, reference_samples=None,
               progress: bool = False, log: Log = print) -> tuple[dict, object]:
    """Rounds `first_round`..`online.rounds` of online DPO under `base.train.output`.

    `base.model.model` is the starting model: the reference of every round (unless
    `base.model.reference_model` names another) and the policy of round 1. `start_policy` lets a
    caller that already trained round 1 (the demo's offline run) continue from it at round 2.
    Each round's pairs go to OUTPUT/pairs/round-N.jsonl and its model to OUTPUT/round-N/, with its
    evaluation.json; OUTPUT/online.json holds every round's figures. `sampling` draws both the
    pair samples (K = `online.samples_per_prompt`, a fresh seed per round) and the evaluation's.
    Returns ({"rounds": [...], "points": [reference row, round rows], ...}, the reference's
    evaluation samples, for a caller that evaluates more runs against the same reference).
    The folder is locked for the command's life (one writer at a time).
    """
    if online.rounds < first_round or online.samples_per_prompt < 2:
        raise DpokitError(f"--rounds must be at least {first_round} and --samples-per-prompt at least 2 "
                          f"(got {online.rounds} and {online.samples_per_prompt})")
    validate_sampling(sampling)
    check_run_paths(base, [("--prompts", judging.prompts), ("--eval-prompts", online.eval_prompts),
                           ("--judge", judging.judge)])
    with run_folder_lock(base.train.output):
        return _run_rounds(base, prompts, online, judging, sampling, eval_prompts=eval_prompts, judge=judge,
                           start_policy=start_policy, first_round=first_round,
                           reference_samples=reference_samples, progress=progress, log=log)


def _run_rounds(base: RunConfig, prompts: Sequence, online: OnlineConfig, judging: JudgeConfig,
                sampling: SamplingConfig, *, eval_prompts: Sequence | None, judge, start_policy: str | None,
                first_round: int, reference_samples, progress: bool, log: Log) -> tuple[dict, object]:
    from dpokit.eval.judges import load_judge
    from dpokit.eval.report import plot_frontier
    from dpokit.experiments.sweep import evaluate_run, prepare_root, write_frontier_csv
    from dpokit.model.load import load_policy, load_tokenizer, resolve_device
    from dpokit.train.loop import train

    root = prepare_root(base)
    device = resolve_device(base.model.device)
    judge = judge or load_judge(judging.judge, device=device, batch_size=judging.judge_batch_size)
    starting_model = base.model.model
    reference_name = base.model.reference_model or starting_model
    tokenizer = load_tokenizer(base.model.tokenizer or starting_model, base.model.trust_remote_code)
    reference = load_policy(reference_name, device, base.model.trust_remote_code).eval()
    eval_prompts = list(eval_prompts or prompts)
    policy_name = start_policy or starting_model
    pair_sampling = copy.deepcopy(sampling)
    pair_sampling.num_samples = online.samples_per_prompt
    rounds: list[dict] = []
    points: list[dict] = []
    (root / "pairs").mkdir(parents=True, exist_ok=True)
    for number in range(first_round, online.rounds + 1):
        log(f"--- online round {number}/{online.rounds}: sampling {online.samples_per_prompt} per prompt "
            f"from {policy_name}")
        policy = load_policy(policy_name, device, base.model.trust_remote_code).eval()
        pair_sampling.sample_seed = sampling.sample_seed + ROUND_SEED_STRIDE * number
        rows, stats = sample_preference_pairs(
            policy, tokenizer, prompts, judge, pair_sampling, pairing=online.pairing, judge_name=judging.judge,
            judge_batch_size=judging.judge_batch_size, dtype=base.model.dtype, progress=progress)
        del policy
        if not rows:
            raise DpokitError(f"online round {number}: every pair was a tie; nothing to train on "
                              "(raise --samples-per-prompt or --max-new-tokens)")
        pairs_file = write_pairs(root / "pairs" / f"round-{number}.jsonl", rows)
        log(f"round {number}: {stats['pairs']} pairs (samples' mean reward {stats['sample_reward']:+.4f}; "
            f"skipped {stats['skipped']})")
        cfg = copy.deepcopy(base)
        cfg.model.model, cfg.model.reference_model = policy_name, reference_name
        cfg.model.tokenizer = base.model.tokenizer or starting_model
        cfg.data.data = str(pairs_file)
        cfg.train.output = str(root / f"round-{number}")
        validate(cfg)
        result = train(cfg, log=log)
        done = evaluate_run(cfg.train.output, f"round-{number}", "online DPO", cfg.loss.beta, reference=reference,
                            tokenizer=tokenizer, prompts=eval_prompts, sampling=sampling, judge=judge,
                            judging=judging, dtype=base.model.dtype, reference_samples=reference_samples,
                            final_eval=result.final_eval, trust_remote_code=base.model.trust_remote_code,
                            progress=progress, log=log)
        reference_samples = done.reference_samples
        points = [done.reference_row] + [r["point"] for r in rounds] + [{**done.row, "label": f"round {number}"}]
        rounds.append({"round": number, "policy_sampled": policy_name, "pairs_file": str(pairs_file),
                       "pair_stats": stats, "point": points[-1]})
        write_frontier_csv(points, root / "frontier.csv")
        policy_name = cfg.train.output
    plot_frontier(points, root / "frontier.png",
                  title=f"online DPO, reward–KL by round: {Path(starting_model).name}, judge {judging.judge}")
    summary = {"model": starting_model, "reference": reference_name, "judge": judging.judge,
               "samples_per_prompt": online.samples_per_prompt, "pairing": online.pairing,
               "prompts": len(prompts), "eval_prompts": len(eval_prompts), "rounds": rounds, "points": points}
    atomic_write_text(root / "online.json", json.dumps(summary, indent=1))
    log(f"wrote {root / 'online.json'}, {root / 'frontier.csv'} and {root / 'frontier.png'}")
    return summary, reference_samples
