"""Judges score (prompt, response) pairs with a float: higher is better.

A Judge is any callable `(prompts: list[str], responses: list[str]) -> list[float]`.
`load_judge(spec)` builds one from a spec:

- `sentiment`: VADER's compound score of the response, in [-1, 1] (Hutto & Gilbert 2014). A
  lexicon and rules, no model: offline, deterministic, fast on CPU, and meaningful on short
  texts, which is what the built-in movie-review demo needs from its ground-truth judge.
- `module:function` or `path/to/file.py:function`: your own batch scoring function.
- a folder holding a Hugging Face `AutoModelForSequenceClassification` reward model: the score
  of `prompt + response` is its single logit (or logit[1] - logit[0] for a two-label classifier).

`score_responses` wraps every call: a judge that raises, returns the wrong number of scores, or
returns a non-finite or non-numeric score fails with the row that caused it, never a silent 0.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from dpokit.errors import DpokitError, first_line
from dpokit.model.load import load_tokenizer
from dpokit.settings_checks import context_limit

Judge = Callable[[list[str], list[str]], list[float]]

JUDGE_SPECS = "'sentiment', 'module:function', 'path/to/file.py:function', or a reward-model folder"


class SentimentJudge:
    """VADER compound sentiment of the response alone, in [-1, 1] (the prompt is ignored: it is
    the same for every model compared, and VADER's normalised score would blend the two)."""

    def __init__(self) -> None:
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError:  # pragma: no cover - a declared dependency
            raise DpokitError("the sentiment judge needs the vaderSentiment package (pip install dpokit)") from None
        self._analyzer = SentimentIntensityAnalyzer()

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        return [float(self._analyzer.polarity_scores(text)["compound"]) for text in responses]


class RewardModelJudge:
    """A sequence-classification reward model scoring `prompt + response`, in padded batches."""

    def __init__(self, path: str, device: torch.device | str = "cpu", batch_size: int = 16):
        from transformers import AutoModelForSequenceClassification

        self.tokenizer = load_tokenizer(path)
        try:
            self.model, loading = AutoModelForSequenceClassification.from_pretrained(
                path, dtype=torch.float32, output_loading_info=True)
        except (OSError, ValueError) as exc:
            raise DpokitError(f"judge {path}: not a sequence-classification model ({first_line(exc)})") from None
        _check_scoring_head(path, loading["missing_keys"])
        if self.model.config.num_labels not in (1, 2):
            raise DpokitError(f"judge {path}: has {self.model.config.num_labels} labels; a reward model needs 1 "
                              "(its logit is the reward) or 2 (logit[1] - logit[0])")
        # The model finds each row's last real token through pad_token_id.
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.tokenizer.padding_side = "right"
        self.tokenizer.truncation_side = "left"  # keep the end of a long text: the response is judged
        self.model.to(device).eval()
        self.device, self.batch_size = torch.device(device), batch_size
        # Texts are cut (from the left) at the model's positions, by the rule training caps at.
        limit = context_limit(self.model.config, self.tokenizer)
        self.max_length = limit[0] if limit is not None else None

    @torch.no_grad()
    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        scores: list[float] = []
        for start in range(0, len(prompts), self.batch_size):
            texts = [p + r for p, r in zip(prompts[start:start + self.batch_size],
                                           responses[start:start + self.batch_size], strict=True)]
            enc = self.tokenizer(texts, padding=True, truncation=self.max_length is not None,
                                 max_length=self.max_length, return_tensors="pt").to(self.device)
            logits = self.model(**enc).logits.float()
            reward = logits[:, 0] if logits.shape[1] == 1 else logits[:, 1] - logits[:, 0]
            scores.extend(reward.tolist())
        return scores


def _check_scoring_head(path: str, missing: set[str]) -> None:
    """Weights missing from the checkpoint are freshly random (a causal LM has no scoring head): such a
    "judge" would score by chance, differently at every load."""
    if missing:
        names = ", ".join(sorted(missing)[:4]) + (", ..." if len(missing) > 4 else "")
        raise DpokitError(f"judge {path}: its weights lack the scoring head ({names} missing), so it would score "
                          "at random; give a trained reward model (AutoModelForSequenceClassification), not a "
                          "causal LM")


def _import_function(spec: str) -> Judge:
    module_name, _, attr = spec.rpartition(":")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise DpokitError(f"judge {spec}: file {path} does not exist")
        module_spec = importlib.util.spec_from_file_location(f"_dpokit_judge_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:  # noqa: BLE001 - the user's module; report it on one line
            raise DpokitError(f"judge {spec}: importing {path} failed: {type(exc).__name__}: {exc}") from None
    else:
        # The working directory is where users keep their judge module; `dpokit` as an installed
        # script does not search it by default.
        added = "" not in sys.path and str(Path.cwd()) not in sys.path
        if added:
            sys.path.insert(0, str(Path.cwd()))
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise DpokitError(f"judge {spec}: cannot import module '{module_name}' ({exc})") from None
        finally:
            if added:
                sys.path.remove(str(Path.cwd()))
    function = getattr(module, attr, None)
    if not callable(function):
        raise DpokitError(f"judge {spec}: '{attr}' is not a callable in {module_name}")
    return function


def load_judge(spec: str, device: torch.device | str = "cpu", batch_size: int = 16) -> Judge:
    """Build a judge from its spec: 'sentiment', 'module:function', or a reward-model folder."""
    if not spec:
        raise DpokitError(f"--judge is required: {JUDGE_SPECS}")
    if spec == "sentiment":
        return SentimentJudge()
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise DpokitError(f"judge {spec}: folder has no config.json, so it is not a Hugging Face model")
        return RewardModelJudge(str(path), device=device, batch_size=batch_size)
    if ":" in spec and spec.rpartition(":")[2].isidentifier():
        return _import_function(spec)
    raise DpokitError(f"unknown judge '{spec}': use {JUDGE_SPECS}")


def score_responses(judge: Judge, prompts: Sequence[str], responses: Sequence[str], *, batch_size: int = 16,
                    name: str = "judge") -> list[float]:
    """Call `judge` in batches and check every score; a failure names the row (0-based) it came from."""
    scores: list[float] = []
    for start in range(0, len(prompts), batch_size):
        batch_p, batch_r = list(prompts[start:start + batch_size]), list(responses[start:start + batch_size])
        try:
            out = list(judge(batch_p, batch_r))
        except DpokitError:
            raise
        except Exception as exc:  # noqa: BLE001 - find the row, then report it on one line
            row = start + _failing_row(judge, batch_p, batch_r)
            raise DpokitError(f"{name} failed on row {row} (response {responses[row][:60]!r}): "
                              f"{type(exc).__name__}: {first_line(exc)}") from None
        if len(out) != len(batch_r):
            raise DpokitError(f"{name} returned {len(out)} scores for rows {start}-{start + len(batch_r) - 1} "
                              f"({len(batch_r)} responses); it must return one float per response")
        for offset, value in enumerate(out):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise DpokitError(f"{name} returned {value!r} for row {start + offset} "
                                  f"(response {batch_r[offset][:60]!r}); scores must be finite numbers")
            scores.append(float(value))
    return scores


def _failing_row(judge: Judge, prompts: list[str], responses: list[str]) -> int:
    """Rescore one row at a time to find the first that raises (0 if none does alone)."""
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        try:
            judge([p], [r])
        except Exception:  # noqa: BLE001
            return i
    return 0


