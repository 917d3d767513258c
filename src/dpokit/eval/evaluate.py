"""What the trained policy does now, what it gained and what it paid in KL.

Every function returns plain, JSON-serialisable dicts of figures:

- `preference_metrics`: implicit-reward accuracy, margin, chosen/rejected rewards on preference
  pairs, computed by the training scorer (`PairScorer.evaluate`), so the definitions are training's.
- `judged_comparison`: mean judged reward of policy and reference samples and the policy's win
  rate (ties count half).
- `evaluate_on_prompts`: samples of policy and reference judged, and the KL paid
  (`dpokit.eval.kl.kl_estimate`: from the policy's own samples, with its standard error).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from dpokit.config import (
    DataConfig,
    JudgeConfig,
    LossConfig,
    ModelConfig,
    SamplingConfig,
    SpeedConfig,
    validate_data,
)
from dpokit.data import PairTokenizer, load_tokenized_pairs
from dpokit.data.templates import parse_template_kwargs
from dpokit.errors import DpokitError
from dpokit.eval.judges import Judge, load_judge, score_responses
from dpokit.eval.kl import _kl_and_log_ratios, _per_prompt_means, mean_and_stderr
from dpokit.eval.sampling import (
    Completion,
    Prompt,
    SampleSet,
    generate_completions,
    prompt_text,
    read_prompts,
)
from dpokit.eval.synced_reference import synced_reference
from dpokit.io import Log, read_run_config
from dpokit.model.load import autocast_context, load_policy, load_tokenizer, resolve_device
from dpokit.scoring import guarded_scorer
from dpokit.settings_checks import fit_max_length

EXAMPLES_KEPT = 3
# The sections of figures an evaluation result holds, in the order they are shown.
EVALUATION_SECTIONS = ("preferences", "preferences_synced_reference", "judged", "kl")


def format_number(value: float) -> str:
    """Four decimals, or three significant digits in scientific form for small magnitudes."""
    if math.isfinite(value) and value != 0 and abs(value) < 1e-3:
        return f"{value:.3e}"
    return f"{value:.4f}"


# --- preference data -----------------------------------------------------------------------


def preference_metrics(policy, reference, tokenizer, data_path: str, *, loss: LossConfig,
                       data: DataConfig | None = None, batch_size: int = 8, device: torch.device,
                       dtype: str = "fp32", log: Log = print) -> dict:
    """Implicit-reward figures of `policy` against `reference` on a file of preference pairs, read
    and tokenized by `data`'s settings (format, columns, lengths, truncation) as training does."""

    data = data or DataConfig()
    pairs = load_tokenized_pairs(data_path, PairTokenizer.from_config(tokenizer, data), log, data)
    # The layouts training would pick, checked on the first batch as training checks them.
    scorer = guarded_scorer(policy, reference, pairs, batch_size=batch_size, loss=loss, speed=SpeedConfig(),
                            dtype=dtype, pad_id=tokenizer.pad_token_id, device=device, log=log)
    figures = scorer.evaluate(pairs, batch_size)
    return {"data": str(data_path), "pairs": len(pairs), "loss_name": loss.loss_spec, "beta": loss.beta,
            **{name.removeprefix("eval_"): value for name, value in figures.items()}}


# --- samples and judges --------------------------------------------------------------------


@dataclass(frozen=True)
class Sampler:
    """How an experiment draws and scores samples: one tokenizer, one set of sampling settings,
    one judge and the run's chat-template arguments, the same for every model it compares."""

    tokenizer: Any
    sampling: SamplingConfig
    judge: Judge | None = None  # None: samples are drawn, not scored
    judging: JudgeConfig = field(default_factory=JudgeConfig)  # the judge's name (its spec) and batch size
    dtype: str = "fp32"
    template_kwargs: dict[str, Any] | None = None  # the run's --chat-template-kwargs
    progress: bool = False

    def draw(self, model, prompts: Sequence[Prompt]) -> SampleSet:
        """K completions per prompt from `model` and, with a judge, the score of each one."""
        device = next(model.parameters()).device
        completions: list[list[Completion]] = [[] for _ in prompts]
        for index, per_prompt in generate_completions(
            model, self.tokenizer, prompts, self.sampling, template_kwargs=self.template_kwargs,
            progress=self.progress, autocast=lambda: autocast_context(device, self.dtype),
        ):
            completions[index] = per_prompt
        result = SampleSet(list(prompts), completions)
        if self.judge is not None:
            flat_prompts = [prompt_text(p) for p, per in zip(prompts, completions, strict=True) for _ in per]
            flat = score_responses(self.judge, flat_prompts, [c.text for per in completions for c in per],
                                   batch_size=self.judging.judge_batch_size, name=self.judge_name)
            k = self.sampling.num_samples
            result.rewards = [flat[i * k:(i + 1) * k] for i in range(len(prompts))]
        return result

    @property
    def judge_name(self) -> str:
        return self.judging.judge or "judge"

    def with_sampling(self, **changes) -> Sampler:
        """The same sampler with some sampling settings changed (K, the seed, the temperature...)."""
        return replace(self, sampling=replace(self.sampling, **changes))


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


# --- everything at once --------------------------------------------------------------------


def evaluate_on_prompts(policy, reference, prompts: Sequence[Prompt], sampler: Sampler, *,
                        reference_samples: SampleSet | None = None, log: Log = print) -> tuple[dict, SampleSet]:
    """Sample from policy and reference, judge both, estimate the KL; returns (figures, reference samples).

    Both models are sampled with the same seed (common random numbers: identical models give
    identical samples). Pass `reference_samples` to reuse them across policies (the sweep).
    When the sampling is not ancestral (temperature 1, no top-p/top-k), the KL gets its own
    ancestral samples, since tempered samples do not estimate KL(π ‖ π_ref). `per_prompt` holds
    the KL and the judged rewards prompt by prompt (each a mean over that prompt's samples).
    """
    tokenizer, sampling = sampler.tokenizer, sampler.sampling
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    log(f"sampling {sampling.num_samples} completion(s) for each of {len(prompts)} prompts from the policy")
    policy_samples = sampler.draw(policy, prompts)
    figures: dict = {"sampling": {"temperature": sampling.temperature, "top_p": sampling.top_p,
                                  "top_k": sampling.top_k, "max_new_tokens": sampling.max_new_tokens,
                                  "seed": sampling.sample_seed}}
    if sampler.judge is not None:
        if reference_samples is None:
            log("sampling the same from the reference")
            reference_samples = sampler.draw(reference, prompts)
        figures["judged"] = {"judge": sampler.judge_name, **judged_comparison(policy_samples, reference_samples)}
    kl_samples = policy_samples
    if not sampling.is_ancestral():
        log("drawing separate temperature-1 samples for the KL estimate")
        ancestral = replace(sampler.with_sampling(temperature=1.0, top_p=1.0, top_k=0), judge=None)
        kl_samples = ancestral.draw(policy, prompts)
    figures["kl"], log_ratios = _kl_and_log_ratios(policy, reference, kl_samples, pad_id=pad_id,
                                                   batch_size=sampling.sample_batch_size, dtype=sampler.dtype)
    figures["examples"] = _examples(policy_samples, reference_samples)
    # Per prompt, so that comparisons between models evaluated on these prompts can pair them.
    figures["per_prompt"] = {"kl": _per_prompt_means(log_ratios, kl_samples)}
    if policy_samples.rewards is not None:
        figures["per_prompt"]["reward_policy"] = [sum(r) / len(r) for r in policy_samples.rewards]
        figures["per_prompt"]["reward_reference"] = [sum(r) / len(r) for r in reference_samples.rewards]
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
    lines = []
    for section in EVALUATION_SECTIONS:
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


def run_template_kwargs(model_dir: str | Path) -> dict[str, Any]:
    """The --chat-template-kwargs a dpokit run trained with ({} for any other folder): sampling the
    run renders message prompts with them, as training did."""
    return parse_template_kwargs(((read_run_config(model_dir) or {}).get("data") or {}).get("chat_template_kwargs"))


def loss_config_for(model_dir: str | Path, overrides: dict | None = None) -> LossConfig:
    """β and the loss the run was trained with (when `model_dir` is a dpokit run), then `overrides`."""
    known = {f.name for f in dataclasses.fields(LossConfig)}
    saved = (read_run_config(model_dir) or {}).get("loss") or {}
    return LossConfig(**{k: v for k, v in {**saved, **(overrides or {})}.items() if k in known})


# Data settings `evaluate` takes from a dpokit run: everything that decides which pairs are read
# and how they are tokenized. Not the files themselves, and not --chat-template: the run saved
# its tokenizer with the template it trained with.
RUN_DATA_SETTINGS = ("data_format", "columns", "strict", "drop_tied_scores", "max_length", "max_prompt_length",
                     "min_response_share", "truncation_mode", "chat_template_kwargs", "train_on_turns")


def data_config_for(model_dir: str | Path, data: str, overrides: dict | None = None, log: Log = print) -> DataConfig:
    """The run's own data settings (when `model_dir` is a dpokit run), then `overrides`; logs the result."""
    saved = (read_run_config(model_dir) or {}).get("data") or {}
    inherited = {k: v for k, v in saved.items() if k in RUN_DATA_SETTINGS}
    given = {k: v for k, v in (overrides or {}).items() if k != "data"}
    config = DataConfig(**{**inherited, **given, "data": data})
    validate_data(config)
    source = lambda name: "given" if name in given else "the run's" if name in inherited else "default"  # noqa: E731
    shown = [*RUN_DATA_SETTINGS, *(["chat_template"] if config.chat_template else [])]
    log("data settings: " + ", ".join(f"{name} {getattr(config, name)} ({source(name)})" for name in shown
                                      if getattr(config, name) is not None))  # unset options are not listed
    return config


def evaluate_models(model: ModelConfig, *, data: dict | None = None, loss_overrides: dict | None = None,
                    batch_size: int = 8, judging: JudgeConfig | None = None, sampling: SamplingConfig | None = None,
                    progress: bool = False, log: Log = print) -> dict:
    """Load policy (`model.model`) and reference, then every figure the inputs allow (see the module docstring).

    `model.reference_model` defaults to the model a dpokit run started from (its dpokit_config.yaml);
    so do the data settings: `data` holds the data options given (DataConfig field names, `data`
    naming the preference file), which replace the run's. `judging` names the prompts and the judge.
    """
    judging, data = judging or JudgeConfig(), data or {}
    if not data.get("data") and not judging.prompts:
        raise DpokitError("nothing to evaluate: give --data (preference pairs) and/or --prompts (with --judge)")
    if judging.judge and not judging.prompts:
        raise DpokitError(f"--judge {judging.judge} scores samples drawn for --prompts; give --prompts too, "
                          "or drop --judge")
    reference = model.reference_model or _run_reference(model.model, log)
    data_settings = data_config_for(model.model, data["data"], data, log) if data.get("data") else None
    prompt_list = read_prompts(judging.prompts, judging.max_prompts) if judging.prompts else None
    device = resolve_device(model.device)
    judge = load_judge(judging.judge, device=device, batch_size=judging.judge_batch_size) if judging.judge else None
    tokenizer = load_tokenizer(model.tokenizer or model.model, model.trust_remote_code)
    policy = load_policy(model.model, device, model.trust_remote_code).eval()
    reference_model = load_policy(reference, device, model.trust_remote_code).eval()
    result: dict = {"policy": str(model.model), "reference": str(reference)}
    if data_settings is not None:
        data_settings.max_length = fit_max_length(data_settings.max_length, data_settings.max_prompt_length,
                                                  policy.config, tokenizer, log)
        loss = loss_config_for(model.model, loss_overrides)
        score = lambda against: preference_metrics(  # noqa: E731 - the same pairs and loss, against one reference
            policy, against, tokenizer, data_settings.data, loss=loss, data=data_settings, batch_size=batch_size,
            device=device, dtype=model.dtype, log=log)
        result["preferences"] = {"reference": str(reference), **score(reference_model)}
    if prompt_list:
        sampler = Sampler(tokenizer, sampling or SamplingConfig(), judge=judge, judging=judging, dtype=model.dtype,
                          template_kwargs=run_template_kwargs(model.model), progress=progress)
        figures, _ = evaluate_on_prompts(policy, reference_model, prompt_list, sampler, log=log)
        result.update(figures)
    synced = synced_reference(model.model) if data_settings is not None and not model.reference_model else None
    if synced is not None:  # last: it overwrites the starting reference's weights
        log(f"also against {synced.describe()}: the reference training's evaluations used")
        synced.load_into(reference_model)
        result["preferences_synced_reference"] = {"reference": synced.describe(), **score(reference_model)}
    return result


def held_out_against(policy, reference, tokenizer, run_dir: str | Path, *, device: torch.device, dtype: str = "fp32",
                     log: Log = print) -> dict:
    """A trained run's held-out figures (its --eval-data, read with its own data settings and loss)
    against `reference`, under training's `eval_` names; {} when the run had no held-out data."""
    eval_data = ((read_run_config(run_dir) or {}).get("data") or {}).get("eval_data")
    if not eval_data:
        return {}
    figures = preference_metrics(policy, reference, tokenizer, eval_data, loss=loss_config_for(run_dir),
                                 data=data_config_for(run_dir, eval_data, log=log), device=device, dtype=dtype,
                                 log=log)
    return {f"eval_{name}": value for name, value in figures.items() if name not in ("data", "pairs", "loss_name", "beta")}


def _run_reference(model_dir: str, log: Log) -> str:
    """The model a dpokit run was trained from: its reference (online rounds name one) or its start."""
    saved = (read_run_config(model_dir) or {}).get("model") or {}
    reference = saved.get("reference_model") or saved.get("model")
    if reference is None:
        raise DpokitError(f"--reference-model is required: {model_dir} is not a dpokit run folder naming its base "
                          "model")
    log(f"reference: {reference} (the model {model_dir} was trained from)")
    return reference
