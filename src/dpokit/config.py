"""One tree of dataclasses holds every setting of a run.

Precedence, lowest first: the defaults below, a YAML file (`--config`), then CLI flags. Every
field carries its help text in `metadata["help"]`; the CLI builds its flags from these fields,
so `--help`, YAML and the code can never disagree. The resolved tree is written into the run
folder as `dpokit_config.yaml`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dpokit.errors import DpokitError
from dpokit.losses import check_loss_config


def _opt(default: Any, help: str, **extra: Any) -> Any:
    """A dataclass field with its help text (and optional `choices`) in the metadata."""
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class ModelConfig:
    model: str | None = _opt(None, "policy to train: a local Hugging Face model folder or a hub id (required)")
    tokenizer: str | None = _opt(None, "tokenizer folder or hub id (default: the model's)")
    dtype: str = _opt(
        "fp32",
        "compute precision: fp32, or bf16 autocast with fp32 master weights and optimizer state",
        choices=("fp32", "bf16"),
    )
    device: str = _opt("auto", "device: auto (CUDA when present, else CPU), cpu, cuda, cuda:N")
    trust_remote_code: bool = _opt(False, "allow a hub model to run its own Python code (off by default)")


@dataclass
class DataConfig:
    data: str | None = _opt(None, "training pairs: a JSON Lines file of {prompt, chosen, rejected} rows (required)")
    eval_data: str | None = _opt(None, "held-out pairs in the same format, evaluated every --eval-every steps")
    max_length: int = _opt(1024, "most tokens in prompt + response; longer pairs are truncated (see README)")
    max_prompt_length: int | None = _opt(
        None, "when a pair is too long, first cut its prompt from the left to this many tokens (default: no cut)"
    )


@dataclass
class LossConfig:
    loss: str = _opt("sigmoid", "preference loss (sigmoid = DPO)")
    beta: float = _opt(0.1, "β: higher stays closer to the reference, lower aligns more aggressively")
    label_smoothing: float = _opt(0.0, "ε: assumed fraction of flipped labels (conservative DPO when > 0)")


@dataclass
class TrainConfig:
    output: str | None = _opt(None, "run folder: final model, tokenizer, config and metrics.jsonl (required)")
    overwrite: bool = _opt(False, "allow writing into a non-empty output folder")
    learning_rate: float = _opt(5e-7, "peak AdamW learning rate")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    adam_beta1: float = _opt(0.9, "AdamW β1")
    adam_beta2: float = _opt(0.999, "AdamW β2")
    adam_epsilon: float = _opt(1e-8, "AdamW ε")
    batch_size: int = _opt(8, "pairs per forward pass (each pair is two rows: chosen and rejected)")
    gradient_accumulation_steps: int = _opt(1, "forward passes per optimizer step")
    epochs: float = _opt(1.0, "passes over the training data (ignored when --max-steps is set)")
    max_steps: int | None = _opt(None, "optimizer steps to run (overrides --epochs)")
    warmup_steps: int = _opt(0, "steps of linear learning-rate warm-up from 0")
    warmup_ratio: float = _opt(0.0, "warm-up as a fraction of all steps (used when --warmup-steps is 0)")
    lr_scheduler: str = _opt(
        "cosine", "learning-rate decay after warm-up (toward 0 at the end)", choices=("cosine", "linear", "constant")
    )
    max_grad_norm: float | None = _opt(1.0, "clip the gradient's global L2 norm to this (none: no clipping)")
    seed: int = _opt(42, "seed for initialisation, data order and dropout")
    eval_every: int | None = _opt(None, "evaluate on --eval-data every N steps (default: only at the end)")
    log_every: int = _opt(1, "average metrics over N steps and write one metrics.jsonl line")
    progress: str = _opt("auto", "progress bar: auto (when a terminal), on, off", choices=("auto", "on", "off"))


@dataclass
class SpeedConfig:
    layout: str = _opt(
        "auto",
        "batch layout: padded, packed (padding-free), prefix-shared (each prompt computed once per pair), "
        "or auto (per batch, the cheapest of packed and prefix-shared by a token and attention cost model)",
        choices=("auto", "padded", "packed", "prefix-shared"),
    )
    pack_length: int = _opt(0, "packed rows hold at least this many tokens (0: the batch's longest block)")
    lm_head: str = _opt(
        "auto",
        "LM head: chunked (logits a chunk of positions at a time, recomputed in backward), plain (the "
        "model's full logits), or auto (chunked when exact for the model)",
        choices=("auto", "chunked", "plain"),
    )
    lm_head_chunk: int = _opt(0, "positions per LM-head chunk (0: 4M elements / vocabulary size, at least 16)")
    reference: str = _opt(
        "auto",
        "reference log-probs: precomputed (one no-grad pass before training, cached on disk), live (a "
        "frozen copy of the model), or auto (precomputed)",
        choices=("auto", "precomputed", "live"),
    )
    reference_cache: str | None = _opt(
        None, "folder of cached reference log-probs (default: <output>/reference-cache); share one across a sweep"
    )
    gradient_checkpointing: bool = _opt(False, "recompute activations in backward: less activation memory, about a third more compute")
    compile: bool = _opt(False, "torch.compile the model body (slow first steps; helps most on GPU)")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def global_batch_size(self) -> int:
        return self.train.batch_size * self.train.gradient_accumulation_steps


def section_classes() -> dict[str, type]:
    """Section name -> dataclass, in declaration order."""
    return {f.name: type(getattr(RunConfig(), f.name)) for f in dataclasses.fields(RunConfig)}


def iter_options() -> list[tuple[str, dataclasses.Field]]:
    """Every (section, field) pair; field names are unique across sections so flags stay flat."""
    out = []
    for section, cls in section_classes().items():
        out.extend((section, f) for f in dataclasses.fields(cls))
    return out


def _field_type_name(f: dataclasses.Field) -> str:
    return str(f.type).replace("| None", "").replace("None |", "").strip()


def coerce(value: Any, f: dataclasses.Field, where: str) -> Any:
    """Convert a YAML or CLI value to the field's type, or fail with a message naming `where`."""
    kind = _field_type_name(f)
    optional = "None" in str(f.type)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise DpokitError(f"{where}: a value is required")
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value) if not isinstance(value, str) else int(float(value)) if "e" in value.lower() else int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise DpokitError(f"{where}: expected {kind}, got {value!r}") from None


def load_yaml(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read a YAML config; sections as in RunConfig, or flat option names at the top level."""
    path = Path(path)
    if not path.is_file():
        raise DpokitError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise DpokitError(f"{path}{line}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(raw, dict):
        raise DpokitError(f"{path}: expected a mapping of options at the top level")
    by_name = {f.name: (section, f) for section, f in iter_options()}
    classes = section_classes()
    values: dict[str, dict[str, Any]] = {}
    for key, value in raw.items():
        if key in classes and isinstance(value, dict):
            names = {f.name: f for f in dataclasses.fields(classes[key])}
            for sub, subvalue in value.items():
                if sub not in names:
                    raise DpokitError(f"{path}: unknown option '{key}.{sub}'")
                values.setdefault(key, {})[sub] = coerce(subvalue, names[sub], f"{path}: {key}.{sub}")
        elif key.replace("-", "_") in by_name:
            section, f = by_name[key.replace("-", "_")]
            values.setdefault(section, {})[f.name] = coerce(value, f, f"{path}: {key}")
        else:
            raise DpokitError(f"{path}: unknown option '{key}'")
    return values


def build_config(*layers: dict[str, dict[str, Any]]) -> RunConfig:
    """Defaults, then each layer of {section: {field: value}} in order; then validate."""
    config = RunConfig()
    for layer in layers:
        for section, values in layer.items():
            target = getattr(config, section)
            for name, value in values.items():
                setattr(target, name, value)
    validate(config)
    return config


def validate(config: RunConfig) -> None:
    """Fail fast, before any model is loaded, on settings that cannot work."""
    m, d, lo, t = config.model, config.data, config.loss, config.train
    for section, f in iter_options():
        choices = f.metadata.get("choices")
        value = getattr(getattr(config, section), f.name)
        if choices and value not in choices:
            raise DpokitError(f"--{f.name.replace('_', '-')} must be one of {', '.join(choices)}; got {value!r}")
    required = [("--model", m.model), ("--data", d.data), ("--output", t.output)]
    missing = [flag for flag, value in required if not value]
    if missing:
        raise DpokitError(f"missing required option(s): {', '.join(missing)}")
    positive = {
        "--beta": lo.beta,
        "--learning-rate": t.learning_rate,
        "--batch-size": t.batch_size,
        "--gradient-accumulation-steps": t.gradient_accumulation_steps,
        "--max-length": d.max_length,
        "--log-every": t.log_every,
        "--epochs": t.epochs,
    }
    for flag, value in positive.items():
        if not (value > 0 and math.isfinite(value)):
            raise DpokitError(f"{flag} must be a positive number; got {value}")
    for flag, value in {
        "--max-steps": t.max_steps,
        "--eval-every": t.eval_every,
        "--max-prompt-length": d.max_prompt_length,
        "--max-grad-norm": t.max_grad_norm,
    }.items():
        if value is not None and not value > 0:
            raise DpokitError(f"{flag} must be positive (or none); got {value}")
    for flag, value in {"--pack-length": config.speed.pack_length, "--lm-head-chunk": config.speed.lm_head_chunk}.items():
        if value < 0:
            raise DpokitError(f"{flag} must be >= 0 (0: automatic); got {value}")
    if d.max_prompt_length is not None and d.max_prompt_length >= d.max_length:
        raise DpokitError(
            f"--max-prompt-length ({d.max_prompt_length}) must be below --max-length ({d.max_length})"
        )
    if not 0.0 <= lo.label_smoothing < 0.5:
        raise DpokitError(f"--label-smoothing must be in [0, 0.5); got {lo.label_smoothing}")
    check_loss_config(lo)
    if t.warmup_steps < 0 or not 0.0 <= t.warmup_ratio < 1.0:
        raise DpokitError("--warmup-steps must be >= 0 and --warmup-ratio in [0, 1)")
    if t.weight_decay < 0:
        raise DpokitError(f"--weight-decay must be >= 0; got {t.weight_decay}")
    for flag, value in {"--adam-beta1": t.adam_beta1, "--adam-beta2": t.adam_beta2}.items():
        if not 0.0 <= value < 1.0:
            raise DpokitError(f"{flag} must be in [0, 1); got {value}")


def dump_yaml(config: RunConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
