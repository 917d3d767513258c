"""What the trained policy does now, what it gained and what it paid in KL.

Every function returns plain, JSON-serialisable dicts of figures:

- `preference_metrics`: implicit-reward accuracy, margin, chosen/rejected rewards on preference
  pairs, computed by the training scorer (`PairScorer.evaluate`), so the definitions are training's.
- `judged_comparison`: mean judged reward of policy and reference samples and the policy's win
  rate (ties count half).
- `kl_estimate`: KL(π ‖ π_ref) ≈ mean over the policy's own samples y ~ π(·|x) of
  log π(y|x) − log π_ref(y|x), with its standard error. Log-probs come from the one log-prob path,
  `dpokit.model.logprobs.sequence_logps`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from dpokit.config import DataConfig, LossConfig, RunConfig, SamplingConfig, validate_data
from dpokit.data import TokenizedPair
from dpokit.data.batching import PairBatch, collate_padded
from dpokit.eval.judges import Judge, score_responses
from dpokit.eval.sampling import Completion, Prompt, generate_completions, prompt_text
from dpokit.model.load import autocast_context
from dpokit.model.logprobs import sequence_logps
from dpokit.settings_checks import context_limit, fit_max_length

Log = Callable[[str], None]
EXAMPLES_KEPT = 3


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Sample mean and its standard error s / √n (s with n − 1; 0 for a single value)."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


# --- preference data -----------------------------------------------------------------------


def preference_metrics(policy, reference, tokenizer, data_path: str, *, loss: LossConfig,
                       data: DataConfig | None = None, batch_size: int = 8, device: torch.device,
                       dtype: str = "fp32", log: Log = print) -> dict:
    """Implicit-reward figures of `policy` against `reference` on a file of preference pairs, read
    and tokenized by `data`'s settings (format, columns, lengths, truncation) as training does."""
    from dpokit.data import PairTokenizer, load_tokenized_pairs
    from dpokit.scoring import PairScorer

    cfg = RunConfig()
    cfg.loss = loss
    cfg.model.dtype = dtype
    data = data or DataConfig()
    pairs = load_tokenized_pairs(data_path, PairTokenizer.from_config(tokenizer, data), log, data)
    figures = PairScorer(cfg, policy, reference, tokenizer.pad_token_id, device).evaluate(pairs, batch_size)
    return {"data": str(data_path), "pairs": len(pairs), "loss_name": loss.loss_spec, "beta": loss.beta,
            **{name.removeprefix("eval_"): value for name, value in figures.items()}}


# --- samples and judges --------------------------------------------------------------------


@dataclass
class SampleSet:
    """K completions per prompt from one model, and their judged rewards when a judge was given."""

    prompts: list[Prompt]
    completions: list[list[Completion]]
    rewards: list[list[float]] | None = None

    @property
    def texts(self) -> list[list[str]]:
        return [[c.text for c in per_prompt] for per_prompt in self.completions]


def draw_samples(model, tokenizer, prompts: Sequence[Prompt], sampling: SamplingConfig, *, dtype: str = "fp32",
                 judge: Judge | None = None, judge_name: str = "judge", judge_batch_size: int = 16,
                 progress: bool = False) -> SampleSet:
    """Sample K completions per prompt and, with a judge, score each one."""
    device = next(model.parameters()).device
    completions: list[list[Completion]] = [[] for _ in prompts]
    for index, per_prompt in generate_completions(
        model, tokenizer, prompts, num_samples=sampling.num_samples, temperature=sampling.temperature,
        top_p=sampling.top_p, top_k=sampling.top_k, max_new_tokens=sampling.max_new_tokens,
        seed=sampling.sample_seed, batch_size=sampling.sample_batch_size, progress=progress,
        autocast=lambda: autocast_context(device, dtype),
    ):
        completions[index] = per_prompt
    result = SampleSet(list(prompts), completions)
    if judge is not None:
        flat_prompts = [prompt_text(p) for p, per in zip(prompts, completions, strict=True) for _ in per]
        flat = score_responses(judge, flat_prompts, [c.text for per in completions for c in per],
                               batch_size=judge_batch_size, name=judge_name)
        k = sampling.num_samples
        result.rewards = [flat[i * k:(i + 1) * k] for i in range(len(prompts))]
    return result


def judged_comparison(policy: SampleSet, reference: SampleSet) -> dict:
    """Mean judged reward of each model, and the policy's win rate over the reference.

    The win rate compares, for each prompt, every policy sample with every reference sample
    (1 for a higher reward, 1/2 for a tie), averages per prompt, then over prompts; its standard
    error is across prompts. Identical samples give exactly 1/2.
    """
    if policy.rewards is None or reference.rewards is None:
        raise ValueError("judged_comparison needs both sample sets scored by a judge")
    per_prompt_wins = []
    for mine, theirs in zip(policy.rewards, reference.rewards, strict=True):
        wins = sum((a > b) + 0.5 * (a == b) for a in mine for b in theirs)
        per_prompt_wins.append(wins / (len(mine) * len(theirs)))
    reward_policy, se_policy = mean_and_stderr([r for per in policy.rewards for r in per])
    reward_reference, se_reference = mean_and_stderr([r for per in reference.rewards for r in per])
    win_rate, se_win = mean_and_stderr(per_prompt_wins)
    return {"prompts": len(policy.rewards), "samples_per_prompt": len(policy.rewards[0]),
            "reward_policy": reward_policy, "reward_policy_stderr": se_policy,
            "reward_reference": reward_reference, "reward_reference_stderr": se_reference,
            "reward_gain": reward_policy - reward_reference,
            "win_rate": win_rate, "win_rate_stderr": se_win}


# --- KL to the reference -------------------------------------------------------------------


def _rows_batch(rows: Sequence[Completion], pad_id: int) -> PairBatch:
    """Completions as the chosen halves of a padded pair batch, so the one log-prob path scores
    them; each rejected half is a one-token stand-in, nearly free, that the caller ignores."""
    pairs = [TokenizedPair(tuple(r.prompt_ids), tuple(r.response_ids), tuple(r.response_ids[:1]), index=i)
             for i, r in enumerate(rows)]
    return collate_padded(pairs, pad_id)


@torch.no_grad()
def completion_logps(model, completions: Sequence[Completion], *, pad_id: int, batch_size: int = 16,
                     dtype: str = "fp32") -> list[float]:
    """Summed log-prob of each completion's response tokens (EOS included when generated)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[float] = []
    try:
        for start in range(0, len(completions), batch_size):
            chunk = completions[start:start + batch_size]
            batch = _rows_batch(chunk, pad_id).to(device)
            with autocast_context(device, dtype):
                logps = sequence_logps(model, batch)
            out.extend(logps.chosen_logps.tolist())
    finally:
        model.train(was_training)
    return out


def kl_estimate(policy, reference, policy_samples: SampleSet, *, pad_id: int, batch_size: int = 16,
                dtype: str = "fp32") -> dict:
    """KL(π ‖ π_ref) from samples of π: mean of log π(y|x) − log π_ref(y|x), with standard error.

    Unbiased only when the samples were drawn from π itself (temperature 1, no top-p/top-k);
    responses cut at max_new_tokens make it the KL of the first max_new_tokens tokens.
    """
    flat = [c for per in policy_samples.completions for c in per]
    policy_logps = completion_logps(policy, flat, pad_id=pad_id, batch_size=batch_size, dtype=dtype)
    reference_logps = completion_logps(reference, flat, pad_id=pad_id, batch_size=batch_size, dtype=dtype)
    log_ratios = [p - r for p, r in zip(policy_logps, reference_logps, strict=True)]
    kl, stderr = mean_and_stderr(log_ratios)
    return {"kl": kl, "kl_stderr": stderr, "sequences": len(flat),
            "unfinished_fraction": sum(not c.finished for c in flat) / len(flat),
            "logp_policy": sum(policy_logps) / len(flat), "logp_reference": sum(reference_logps) / len(flat),
            "response_tokens": sum(len(c.response_ids) for c in flat) / len(flat)}


# --- everything at once --------------------------------------------------------------------


def evaluate_on_prompts(policy, reference, tokenizer, prompts: Sequence[Prompt], sampling: SamplingConfig, *,
                        judge: Judge | None = None, judge_name: str = "judge", judge_batch_size: int = 16,
                        dtype: str = "fp32", reference_samples: SampleSet | None = None,
                        progress: bool = False, log: Log = print) -> tuple[dict, SampleSet]:
    """Sample from policy and reference, judge both, estimate the KL; returns (figures, reference samples).

    Both models are sampled with the same seed (common random numbers: identical models give
    identical samples). Pass `reference_samples` to reuse them across policies (the sweep).
    When `sampling` is not ancestral (temperature 1, no top-p/top-k), the KL gets its own
    ancestral samples, since tempered samples do not estimate KL(π ‖ π_ref).
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    draw = dict(dtype=dtype, judge=judge, judge_name=judge_name, judge_batch_size=judge_batch_size,
                progress=progress)
    log(f"sampling {sampling.num_samples} completion(s) for each of {len(prompts)} prompts from the policy")
    policy_samples = draw_samples(policy, tokenizer, prompts, sampling, **draw)
    figures: dict = {"sampling": {"temperature": sampling.temperature, "top_p": sampling.top_p,
                                  "top_k": sampling.top_k, "max_new_tokens": sampling.max_new_tokens,
                                  "seed": sampling.sample_seed}}
    if judge is not None:
        if reference_samples is None:
            log("sampling the same from the reference")
            reference_samples = draw_samples(reference, tokenizer, prompts, sampling, **draw)
        figures["judged"] = {"judge": judge_name, **judged_comparison(policy_samples, reference_samples)}
    kl_samples = policy_samples
    if not sampling.is_ancestral():
        log("drawing separate temperature-1 samples for the KL estimate")
        ancestral = SamplingConfig(**{**vars(sampling), "temperature": 1.0, "top_p": 1.0, "top_k": 0})
        kl_samples = draw_samples(policy, tokenizer, prompts, ancestral, dtype=dtype, progress=progress)
    figures["kl"] = kl_estimate(policy, reference, kl_samples, pad_id=pad_id,
                                batch_size=sampling.sample_batch_size, dtype=dtype)
    figures["examples"] = _examples(policy_samples, reference_samples)
    return figures, reference_samples


def _examples(policy: SampleSet, reference: SampleSet | None) -> list[dict]:
    out = []
    for i in range(min(EXAMPLES_KEPT, len(policy.prompts))):
        row = {"prompt": prompt_text(policy.prompts[i]), "policy": policy.completions[i][0].text}
        if policy.rewards is not None:
            row["policy_reward"] = policy.rewards[i][0]
        if reference is not None:
            row["reference"] = reference.completions[i][0].text
            if reference.rewards is not None:
                row["reference_reward"] = reference.rewards[i][0]
        out.append(row)
    return out


def format_table(result: dict) -> str:
    """A readable two-column table of every figure in an evaluation result."""
    from dpokit.eval.report import format_number

    lines = []
    for section in ("preferences", "judged", "kl"):
        if section not in result:
            continue
        lines.append(f"{section}:")
        for name, value in result[section].items():
            shown = format_number(value) if isinstance(value, float) else str(value)
            lines.append(f"  {name:<26} {shown}")
    for example in result.get("examples", []):
        lines.append(f"example: {example['prompt'][:70]!r}")
        for who in ("policy", "reference"):
            if who in example:
                reward = f" [{example[who + '_reward']:+.3f}]" if who + "_reward" in example else ""
                lines.append(f"  {who:<9}{reward} {example[who][:100]!r}")
    return "\n".join(lines)



# --- the `dpokit evaluate` command ----------------------------------------------------------


def run_config_of(model_dir: str | Path) -> dict | None:
    """The resolved config a dpokit run wrote beside its model, or None for any other folder."""
    import yaml

    path = Path(model_dir) / "dpokit_config.yaml"
    if not path.is_file():
        return None
    loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    return loaded if isinstance(loaded, dict) else None


def loss_config_for(model_dir: str | Path, overrides: dict | None = None) -> LossConfig:
    """β and the loss the run was trained with (when `model_dir` is a dpokit run), then `overrides`."""
    known = {f.name for f in dataclasses.fields(LossConfig)}
    saved = (run_config_of(model_dir) or {}).get("loss") or {}
    return LossConfig(**{k: v for k, v in {**saved, **(overrides or {})}.items() if k in known})


# Data settings `evaluate` takes from a dpokit run: everything that decides which pairs are read
# and how they are tokenized. Not the files themselves, and not --chat-template: the run saved
# its tokenizer with the template it trained with.
RUN_DATA_SETTINGS = ("data_format", "columns", "strict", "drop_tied_scores", "max_length", "max_prompt_length",
                     "min_response_share", "truncation_mode", "chat_template_kwargs", "train_on_turns")


def data_config_for(model_dir: str | Path, data: str, overrides: dict | None = None, log: Log = print) -> DataConfig:
    """The run's own data settings (when `model_dir` is a dpokit run), then `overrides`; logs the result."""
    saved = (run_config_of(model_dir) or {}).get("data") or {}
    inherited = {k: v for k, v in saved.items() if k in RUN_DATA_SETTINGS}
    given = {k: v for k, v in (overrides or {}).items() if k != "data"}
    config = DataConfig(**{**inherited, **given, "data": data})
    validate_data(config)
    source = lambda name: "given" if name in given else "the run's" if name in inherited else "default"  # noqa: E731
    shown = [*RUN_DATA_SETTINGS, *(["chat_template"] if config.chat_template else [])]
    log("data settings: " + ", ".join(f"{name} {getattr(config, name)} ({source(name)})" for name in shown
                                      if getattr(config, name) is not None))  # unset options are not listed
    return config


def evaluate_models(model: str, reference: str | None = None, *, tokenizer: str | None = None,
                    device: str = "auto", dtype: str = "fp32", trust_remote_code: bool = False,
                    data: str | None = None, loss_overrides: dict | None = None,
                    data_overrides: dict | None = None, batch_size: int = 8,
                    prompts: str | None = None, max_prompts: int | None = None, judge: str | None = None,
                    judge_batch_size: int = 16, sampling: SamplingConfig | None = None,
                    progress: bool = False, log: Log = print) -> dict:
    """Load policy and reference, then every figure the inputs allow (see the module docstring).

    `reference` defaults to the model a dpokit run started from (its dpokit_config.yaml); so do the
    data settings of `data` (`data_overrides`, DataConfig field names, replace them).
    """
    from dpokit.errors import DpokitError
    from dpokit.eval.judges import load_judge
    from dpokit.eval.sampling import read_prompts
    from dpokit.model.load import load_policy, load_tokenizer, resolve_device

    if not data and not prompts:
        raise DpokitError("nothing to evaluate: give --data (preference pairs) and/or --prompts (with --judge)")
    if judge and not prompts:
        raise DpokitError(f"--judge {judge} scores samples drawn for --prompts; give --prompts too, or drop --judge")
    if reference is None:
        saved = (run_config_of(model) or {}).get("model") or {}
        reference = saved.get("reference_model") or saved.get("model")  # online rounds name their reference
        if reference is None:
            raise DpokitError(f"--reference-model is required: {model} is not a dpokit run folder naming its base "
                              "model")
        log(f"reference: {reference} (the model {model} was trained from)")
    sampling = sampling or SamplingConfig()
    data_settings = data_config_for(model, data, data_overrides, log) if data else None
    prompt_list = read_prompts(prompts, max_prompts) if prompts else None
    torch_device = resolve_device(device)
    judge_fn = load_judge(judge, device=torch_device, batch_size=judge_batch_size) if judge else None
    tok = load_tokenizer(tokenizer or model, trust_remote_code)
    policy = load_policy(model, torch_device, trust_remote_code).eval()
    reference_model = load_policy(reference, torch_device, trust_remote_code).eval()
    result: dict = {"policy": str(model), "reference": str(reference)}
    if data:
        data_settings.max_length = fit_max_length(data_settings.max_length, data_settings.max_prompt_length,
                                                  context_limit(policy.config, tok), log)
        result["preferences"] = preference_metrics(
            policy, reference_model, tok, data, loss=loss_config_for(model, loss_overrides), data=data_settings,
            batch_size=batch_size, device=torch_device, dtype=dtype, log=log)
    if prompt_list:
        figures, _ = evaluate_on_prompts(policy, reference_model, tok, prompt_list, sampling, judge=judge_fn,
                                         judge_name=judge or "judge", judge_batch_size=judge_batch_size,
                                         dtype=dtype, progress=progress, log=log)
        result.update(figures)
    return result
