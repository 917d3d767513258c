"""A Hugging Face model card (`README.md`) for a trained run folder or an exported model.

The Hub reads the YAML front matter (`base_model`, `library_name`, `tags`, `datasets`,
`pipeline_tag`); people read the rest: the loss and its settings, the data kept and skipped, the
final figures and any evaluation, how to load the model, and the DPO paper to cite. Everything
comes from the run folder itself (`dpokit.runinfo`), so the card says only what was measured.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from dpokit.io import atomic_write_text
from dpokit.paths import local_path
from dpokit.runinfo import RunInfo, read_run

CARD_FILE = "README.md"
DPO_CITATION = """@inproceedings{rafailov2023direct,
  title     = {Direct Preference Optimization: Your Language Model is Secretly a Reward Model},
  author    = {Rafailov, Rafael and Sharma, Archit and Mitchell, Eric and Manning, Christopher D. and
               Ermon, Stefano and Finn, Chelsea},
  booktitle = {Advances in Neural Information Processing Systems},
  year      = {2023}
}"""
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_LOSS_SETTINGS = ("loss", "loss_weights", "beta", "label_smoothing", "f_divergence", "simpo_gamma", "orpo_lambda",
                  "rdpo_alpha", "dpop_lambda", "beta_dpo_alpha", "beta_dpo_rho", "discopop_tau",
                  "alpha_divergence_coef", "sync_reference_steps", "sync_reference_alpha",
                  "wpo", "ld_alpha")
_TRAIN_SETTINGS = ("learning_rate", "batch_size", "gradient_accumulation", "max_steps", "epochs", "seed")


def hub_id(spec: Any) -> str | None:
    """`spec` as a Hub repository id (`name` or `org/name`, a `:split` dropped), or None for a
    local path or anything else."""
    if not isinstance(spec, str) or not spec or local_path(spec) is not None:
        return None
    name = spec.split(":", 1)[0]
    return name if _HUB_ID.match(name) else None


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [part.strip() for part in str(value).split(",") if part.strip()]


def front_matter(run: RunInfo) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    base = hub_id(run.setting("model", "model"))
    if base:
        meta["base_model"] = base
    meta["library_name"] = "transformers"
    meta["tags"] = ["dpo", "dpokit", *(f"loss-{name}" for name in _as_list(run.setting("loss", "loss")))]
    datasets = [d for d in (hub_id(run.setting("data", "data")), hub_id(run.setting("data", "eval_data"))) if d]
    if datasets:
        meta["datasets"] = list(dict.fromkeys(datasets))
    meta["pipeline_tag"] = "text-generation"
    return meta


def _table(rows: list[tuple[str, Any]]) -> list[str]:
    lines = ["| | |", "| --- | --- |"]
    for name, value in rows:
        shown = f"{value:.6g}" if isinstance(value, float) else ", ".join(map(str, value)) \
            if isinstance(value, (list, tuple)) else str(value)
        lines.append(f"| {name} | {shown.replace('|', '/')} |")
    return lines + [""]


def _settings(run: RunInfo, section: str, names: tuple[str, ...]) -> list[tuple[str, Any]]:
    values = run.config.get(section) or {}
    # An option that is off (None, or a flag such as --wpo left false) says nothing about the run
    return [(name, values[name]) for name in names if values.get(name) is not None and values.get(name) is not False]


def _data_section(run: RunInfo) -> list[str]:
    lines = ["## Data", ""]
    data = run.setting("data", "data")
    lines.append(f"Trained on `{data}`" + (f", evaluated on `{run.setting('data', 'eval_data')}`"
                                           if run.setting("data", "eval_data") else "") + ".")
    counts = (run.summary.get("data") or {})
    if counts:
        rows = [(name, counts[name]) for name in ("rows_read", "pairs_kept", "pairs_cut") if name in counts]
        rows += [(f"skipped: {reason}", n) for reason, n in (counts.get("skipped") or {}).items()]
        lines += ["", *_table(rows)]
    return lines + [""]


def _results_section(run: RunInfo) -> list[str]:
    lines: list[str] = []
    if run.last_train:
        lines += [f"## Final training figures (step {run.last_train.get('step')})", "",
                  *_table([(k, v) for k, v in run.last_train.items() if k != "step"])]
    if run.last_eval:
        lines += [f"## Held-out figures (step {run.last_eval.get('step')})", "",
                  *_table([(k, v) for k, v in run.last_eval.items() if k.startswith("eval_")])]
    for section, title in (("preferences", "preference accuracy"),
                           ("preferences_synced_reference", "preference accuracy against TR-DPO's synced reference"),
                           ("judged", "judged reward"), ("kl", "KL")):
        figures = run.evaluation.get(section)
        if isinstance(figures, dict):
            lines += [f"## Evaluation: {title}", "",
                      *_table([(k, v) for k, v in figures.items() if not isinstance(v, (dict, list))])]
    return lines


def _usage(name: str) -> list[str]:
    return ["## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            f'model = AutoModelForCausalLM.from_pretrained("{name}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{name}")', "```", "",
            f"or sample from it with dpokit: `dpokit sample --model {name} --prompts prompts.jsonl`.", ""]


def render(run: RunInfo, name: str | None = None) -> str:
    """The card's text: YAML front matter, then the sections."""
    name = name or run.folder.name
    base = run.setting("model", "model")
    losses = ", ".join(_as_list(run.setting("loss", "loss"))) or "sigmoid"
    lines = ["---", yaml.safe_dump(front_matter(run), sort_keys=False).rstrip(), "---", "",
             f"# {name}", "",
             f"A causal language model fine-tuned from `{base}` by dpokit, with Direct Preference "
             f"Optimization (loss: {losses}).", "",
             "## Training", "", *_table(_settings(run, "loss", _LOSS_SETTINGS) + _settings(run, "train", _TRAIN_SETTINGS))]
    lines += _data_section(run) + _results_section(run) + _usage(name)
    lines += ["## Citation", "", "```bibtex", DPO_CITATION, "```", ""]
    return "\n".join(lines)


def write_model_card(folder: str | Path, run_folder: str | Path | None = None, name: str | None = None) -> Path:
    """Write README.md into `folder`, from what `run_folder` (default: `folder`) holds."""
    path = Path(folder) / CARD_FILE
    atomic_write_text(path, render(read_run(run_folder or folder), name))
    return path
