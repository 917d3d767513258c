"""A Hugging Face model card (`README.md`) for a trained run folder or an exported model.

The Hub reads the YAML front matter (`base_model`, `library_name`, `tags`, `datasets`,
`pipeline_tag`); people read the rest: the method and the settings its loss uses, the data kept,
cut and skipped, the final figures and any evaluation, how to load the model, and the paper to
cite. Everything comes from the run folder itself (`dpokit.runinfo`), so the card says only what
was measured, and names local files by their folder or file name, never by this machine's path.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from dpokit.config import LOSS_KINDS, loss_options_in_use
from dpokit.io import atomic_write_text
from dpokit.paths import local_path
from dpokit.runinfo import RunInfo, read_run

CARD_FILE = "README.md"
ADAPTER_CONFIG = "adapter_config.json"  # what peft saves: the folder holds a LoRA adapter, not a model
DPO_CITATION = """@inproceedings{rafailov2023direct,
  title     = {Direct Preference Optimization: Your Language Model is Secretly a Reward Model},
  author    = {Rafailov, Rafael and Sharma, Archit and Mitchell, Eric and Manning, Christopher D. and
               Ermon, Stefano and Finn, Chelsea},
  booktitle = {Advances in Neural Information Processing Systems},
  year      = {2023}
}"""
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# Run-wide loss settings, shown when on (the loss's own options come from `loss_options_in_use`).
_RUN_LOSS_SETTINGS = ("sync_reference_steps", "sync_reference_alpha", "wpo", "ld_alpha")
_TRAIN_SETTINGS = ("learning_rate", "batch_size", "gradient_accumulation_steps", "seed")
_DATA_COUNTS = ("rows_read", "pairs_kept", "rows_cut")
DPO_LOSSES = ("sigmoid", "dpo")


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


def shown_name(spec: Any) -> str:
    """A model or data spec as the card names it: a Hub id as it is, a local path by its last part."""
    if spec is None:
        return "?"
    return hub_id(spec) or Path(str(spec).rstrip("/")).name or str(spec)


def local_hub_base(folder: Path) -> str | None:
    """The Hub id a local model folder says it comes from: `base_model` in its own card's front
    matter, else `_name_or_path` in its config.json; None when neither holds one."""
    card = folder / CARD_FILE
    try:
        text = card.read_text(encoding="utf-8") if card.is_file() else ""
        front = yaml.safe_load(text.split("---")[1]) if text.startswith("---") else None
    except (OSError, UnicodeDecodeError, yaml.YAMLError, IndexError):
        front = None
    candidates = _as_list(front.get("base_model")) if isinstance(front, dict) else []
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = None
    if isinstance(config, dict) and isinstance(config.get("_name_or_path"), str):
        candidates.append(config["_name_or_path"])
    return next((hub_id(c) for c in candidates if hub_id(c)), None)


def base_model(run: RunInfo) -> tuple[str, str | None]:
    """(the base model as the card names it, its Hub id for the front matter or None)."""
    spec = run.setting("model", "model")
    if hub_id(spec):
        return spec, hub_id(spec)
    folder = local_path(spec)
    return shown_name(spec), local_hub_base(folder) if folder is not None and folder.is_dir() else None


def _losses(run: RunInfo) -> list[str]:
    return _as_list(run.setting("loss", "loss")) or ["sigmoid"]


def method(losses: list[str]) -> str:
    """What the run did, in words: SFT alone is not preference optimization."""
    if all(name == "sft" for name in losses):
        return "supervised fine-tuning on the chosen responses"
    if any(name in DPO_LOSSES for name in losses):
        return "Direct Preference Optimization"
    return "preference optimization"


def front_matter(run: RunInfo, adapter: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    base = base_model(run)[1]
    if base:
        meta["base_model"] = base
    meta["library_name"] = "peft" if adapter else "transformers"
    losses = _losses(run)
    sft_only = all(name == "sft" for name in losses)
    meta["tags"] = ["sft" if sft_only else "dpo", "dpokit", *(["lora"] if adapter else []),
                    *(f"loss-{name}" for name in losses)]
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


def training_rows(run: RunInfo) -> list[tuple[str, Any]]:
    """The Training table: the loss and only the options it uses, the optimizer's settings, how
    far the run went (steps and epochs reached), and the LoRA adapter's shape."""
    losses = [name for name in _losses(run) if name in LOSS_KINDS]
    used = loss_options_in_use(losses, run.setting("loss", "f_divergence") or "reverse_kl")
    rows: list[tuple[str, Any]] = [("loss", ", ".join(_losses(run)))]
    if len(losses) > 1:
        rows += _settings(run, "loss", ("loss_weights",))
    rows += _settings(run, "loss", used)
    if run.setting("loss", "sync_reference_steps"):  # TR-DPO: both; else neither means anything
        rows += _settings(run, "loss", _RUN_LOSS_SETTINGS[:2])
    rows += _settings(run, "loss", _RUN_LOSS_SETTINGS[2:]) + _settings(run, "train", _TRAIN_SETTINGS)
    rows += [(shown, run.last_train[name]) for name, shown in (("step", "steps"), ("epoch", "epochs"))
             if name in run.last_train]  # reached, whatever --epochs or --max-steps asked for
    return rows + lora_rows(run)


def lora_rows(run: RunInfo) -> list[tuple[str, Any]]:
    """Rank, α, dropout and target modules of a LoRA run (those peft saved, where it did)."""
    if not run.setting("lora", "lora_r"):
        return []
    targets = _as_list(run.setting("lora", "lora_target_modules"))
    try:
        saved = json.loads((run.folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        targets = sorted({str(name).rsplit(".", 1)[-1] for name in saved["target_modules"]})
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no adapter saved (yet): the modules as configured
    return [*_settings(run, "lora", ("lora_r", "lora_alpha", "lora_dropout")), ("lora_target_modules", targets)]


def _data_section(run: RunInfo) -> list[str]:
    lines = ["## Data", ""]
    data, held_out = run.setting("data", "data"), run.setting("data", "eval_data")
    lines.append(f"Trained on `{shown_name(data)}`" + (f", evaluated on `{shown_name(held_out)}`" if held_out else "")
                 + ".")
    counts = run.summary.get("data") or {}
    if counts:
        rows = [(name, counts[name]) for name in _DATA_COUNTS if name in counts]
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
                      *_table([(k, _without_paths(v)) for k, v in figures.items() if not isinstance(v, (dict, list))])]
    return lines


def _without_paths(value: Any) -> Any:
    """A figure as the card shows it: a local file or folder (the data, a reference) by its name."""
    return shown_name(value) if isinstance(value, str) and local_path(value) is not None else value


def _usage(run: RunInfo, name: str, adapter: bool) -> list[str]:
    """How to load it: by its Hub id when the run pushed it, else by a path to this folder."""
    where = run.setting("train", "push_to_hub") or f"path/to/{name}"
    if adapter:
        base, base_id = base_model(run)
        load_base = base_id if base == base_id else f"path/to/{base}"
        return ["## Use", "", f"A LoRA adapter, not a whole model: load it on its base model `{base}` with peft, or "
                f"fold it into the base weights with `dpokit export path/to/{name} --merge --output MERGED`.", "",
                "```python", "from peft import PeftModel", "from transformers import AutoModelForCausalLM, "
                "AutoTokenizer", "", f'base = AutoModelForCausalLM.from_pretrained("{load_base}")',
                f'model = PeftModel.from_pretrained(base, "{where}")',
                f'tokenizer = AutoTokenizer.from_pretrained("{where}")', "```", ""]
    return ["## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            f'model = AutoModelForCausalLM.from_pretrained("{where}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{where}")', "```", "",
            f"or sample from it with dpokit: `dpokit sample --model {where} --prompts prompts.jsonl`.", ""]


def _summary_line(run: RunInfo, adapter: bool) -> str:
    base, base_id = base_model(run)
    origin = f"`{base}`" if base == base_id else f"the local model `{base}`" + (
        f" (derived from `{base_id}`)" if base_id else "")
    what = "A LoRA adapter" if adapter else "A causal language model"
    merged = " (trained as a LoRA adapter, merged into the base weights)" if run.setting("lora", "lora_r") and \
        not adapter else ""
    return (f"{what} fine-tuned from {origin}{merged} by dpokit, with {method(_losses(run))} "
            f"(loss: {', '.join(_losses(run))}).")


def render(run: RunInfo, name: str | None = None, adapter: bool = False) -> str:
    """The card's text: YAML front matter, then the sections. `adapter`: the folder holds a LoRA
    adapter (peft's files), not a whole model."""
    name = name or run.folder.name
    lines = ["---", yaml.safe_dump(front_matter(run, adapter), sort_keys=False).rstrip(), "---", "",
             f"# {name}", "", _summary_line(run, adapter), "", "## Training", "", *_table(training_rows(run))]
    lines += _data_section(run) + _results_section(run) + _usage(run, name, adapter)
    if method(_losses(run)) != method(["sft"]):
        lines += ["## Citation", "", "```bibtex", DPO_CITATION, "```", ""]
    return "\n".join(lines)


def write_model_card(folder: str | Path, run_folder: str | Path | None = None, name: str | None = None) -> Path:
    """Write README.md into `folder`, from what `run_folder` (default: `folder`) holds."""
    path = Path(folder) / CARD_FILE
    adapter = (Path(folder) / ADAPTER_CONFIG).is_file()
    atomic_write_text(path, render(read_run(run_folder or folder), name, adapter))
    return path
