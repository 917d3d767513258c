"""Sections of the sampling, evaluation, sweep, online and demo commands.

They are not part of RunConfig (a training run does not sample), but follow its rules: one
dataclass field per option, names unique across every section, flags derived from the names
(`flag` in the metadata overrides the derived flag where the command line wants a short name).
"""

from __future__ import annotations

import math

from dpokit.config.choices import PAIRINGS
from dpokit.config.fields import option, section
from dpokit.errors import DpokitError


@section
class SamplingConfig:
    num_samples: int = option(1, "completions drawn per prompt")
    temperature: float = option(1.0, "sampling temperature; 0 = greedy decoding")
    top_p: float = option(1.0, "nucleus sampling: keep the most likely tokens up to this probability mass (1 = off)")
    top_k: int = option(0, "sample among the k most likely tokens only (0 = off)")
    max_new_tokens: int = option(64, "most tokens generated per completion; generation also stops at EOS")
    sample_seed: int = option(0, "sampling seed: same seed, prompts and settings give the same completions")
    sample_batch_size: int = option(16, "sequences generated (and scored) per forward pass")

    def is_ancestral(self) -> bool:
        """True when completions are drawn from the model's own distribution, unmodified."""
        return self.temperature == 1.0 and self.top_p == 1.0 and self.top_k == 0


@section
class JudgeConfig:
    prompts: str | None = option(
        None, "JSON Lines file of prompts: rows with a 'prompt' field (text or chat messages); preference files work too"
    )
    max_prompts: int | None = option(None, "use only the first N prompts of --prompts (default: all)")
    judge: str | None = option(
        None, "scores (prompt, response): 'sentiment' (VADER), 'module:function', or a reward-model folder"
    )
    judge_batch_size: int = option(16, "responses scored per call of the judge")


@section
class SweepConfig:
    betas: tuple[float, ...] = option((0.01, 0.05, 0.1, 0.3, 1.0), "comma-separated β values, one training run each",
                                      flag="--beta")
    losses: str = option(
        "sigmoid", "the loss of each run, as in train (sigmoid,sft is one combined loss, weighted by --loss-weights); "
        "give --loss again to sweep several losses, each trained at every β", flag="--loss")


@section
class OnlineConfig:
    rounds: int = option(3, "rounds of: sample from the current policy, judge, pair, DPO-train, evaluate")
    samples_per_prompt: int = option(4, "K responses sampled per prompt in each round, to pair (at least 2)")
    pairing: str = option(
        "best_worst", "how each prompt's K judged samples become pairs: best_worst (one pair: the best over the "
        "worst) or all (every two with different scores, the higher one chosen)", choices=PAIRINGS,
    )
    eval_prompts: str | None = option(
        None, "JSON Lines prompts to evaluate each round on, kept apart from training (default: --prompts)"
    )


@section
class DemoConfig:
    demo_output: str = option("demo-output", "folder for the demo's files (default: demo-output); an earlier demo's "
                              "folder is replaced, any other that is not empty refused", flag="--output")
    quick: bool = option(False, "a smoke version in under a minute: fewer prompts, one β, short runs")
    full: bool = option(False, "a bigger run: more prompts and samples, five β, longer runs, four online rounds")
    online: bool = option(True, "also run online DPO rounds (continuing the DPO run at the largest β), on the same frontier")
    demo_seed: int = option(0, "seed of the prompts, the sampling and the training", flag="--seed")
    demo_threads: int = option(2, "PyTorch threads (2: fastest on an idle 2-core machine; 1 when other jobs "
                               "share the cores, where a second thread costs much more than it gives)",
                               flag="--threads")


def validate_sampling(s: SamplingConfig) -> None:
    """Fail fast on sampling settings that cannot work."""
    checks = [
        ("--num-samples", s.num_samples >= 1, "at least 1"),
        ("--temperature", s.temperature >= 0 and math.isfinite(s.temperature), ">= 0"),
        ("--top-p", 0 < s.top_p <= 1, "in (0, 1]"),
        ("--top-k", s.top_k >= 0, ">= 0"),
        ("--max-new-tokens", s.max_new_tokens >= 1, "at least 1"),
        ("--sample-batch-size", s.sample_batch_size >= 1, "at least 1"),
    ]
    for flag, ok, rule in checks:
        if not ok:
            raise DpokitError(f"{flag} must be {rule}; got {getattr(s, flag[2:].replace('-', '_'))}")


@section
class SampleCommandConfig:
    prompt: str | None = option(None, "one prompt to complete (or use --prompts for a file)")
    samples_output: str | None = option(
        None, "JSON Lines file of {prompt, completions} rows, streamed as prompts finish (default: print)",
        flag="--output",
    )


@section
class EvaluateCommandConfig:
    json_output: bool = option(False, "print the figures as one JSON object instead of a table", flag="--json")
    evaluation_output: str | None = option(None, "also write the figures as JSON to this file", flag="--output")
