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
    reference_model: str | None = _opt(
        None, "reference model folder or hub id (default: a frozen copy of the initial policy)"
    )
    dtype: str = _opt(
        "fp32",
        "compute precision: fp32; bf16 autocast; or fp16 autocast with dynamic loss scaling. Weights, "
        "gradients and optimizer state stay float32 in every case",
        choices=("fp32", "bf16", "fp16"),
    )
    device: str = _opt("auto", "device: auto (CUDA when present, else CPU), cpu, cuda, cuda:N")
    trust_remote_code: bool = _opt(False, "allow a hub model to run its own Python code (off by default)")


@dataclass
class DataConfig:
    data: str | None = _opt(
        None,
        "training pairs: a .jsonl/.json/.csv/.parquet file, a datasets.save_to_disk folder (FOLDER[:SPLIT]) "
        "or a hub dataset ORG/NAME[:SPLIT] or ORG/NAME:CONFIG:SPLIT (required); .jsonl.gz/.json.gz are read compressed",
    )
    data_config: str | None = _opt(
        None, "hub datasets only: the configuration to load (as in ORG/NAME:CONFIG:SPLIT), for --data and --eval-data"
    )
    data_dir: str | None = _opt(None, "hub datasets only: the folder inside the dataset repository to load (data_dir)")
    eval_data: str | None = _opt(None, "held-out pairs (any source --data takes), evaluated every --eval-every steps")
    data_format: str = _opt(
        "auto",
        "row layout: auto (detected from the first row), standard (prompt/chosen/rejected strings), implicit "
        "(chosen/rejected HH-RLHF transcripts), conversational (message lists), sharegpt (conversations + from/value)",
        choices=("auto", "standard", "implicit", "conversational", "sharegpt"),
    )
    columns: str | None = _opt(
        None, "rename columns first: prompt=question,chosen=good,rejected=bad (a dotted COLUMN reaches a nested "
        "field: score_chosen=meta.score)"
    )
    chat_template: str | None = _opt(
        None, "Jinja chat template file for conversational data (default: the tokenizer's own template)"
    )
    chat_template_kwargs: str | None = _opt(
        None, "JSON object of extra chat template arguments, e.g. '{\"enable_thinking\": false}'; a row's "
        "chat_template_kwargs column overrides it key by key"
    )
    train_on_turns: str = _opt(
        "last", "conversations: last (the loss covers the last assistant turn; chosen and rejected must share "
        "everything before it) or all (every assistant turn from the first one where they differ; only the "
        "assistant's tokens are in the loss)", choices=("last", "all"),
    )
    strict: bool = _opt(
        False, "fail on the first bad row (empty or identical responses, wrong types, ...) instead of skipping it"
    )
    drop_tied_scores: bool = _opt(False, "skip pairs whose score_chosen equals score_rejected (when scores exist)")
    max_length: int = _opt(1024, "most tokens in prompt + response; longer pairs are truncated (see README)")
    max_prompt_length: int | None = _opt(
        None, "when a pair is too long, first cut its prompt to this many tokens (default: only as much as "
        "--min-response-share needs)"
    )
    min_response_share: float = _opt(
        0.25, "when a pair is too long and --max-prompt-length is not set, cut the prompt so the longer response "
        "keeps this share of --max-length (all of it when shorter); 0: never cut prompts, drop a pair whose "
        "prompt alone fills --max-length (default 0.25)"
    )
    truncation_mode: str = _opt(
        "keep_end", "how a prompt is cut: keep_end (drop its start, keep BOS) or keep_start (drop its end); "
        "responses are always cut from the right", choices=("keep_end", "keep_start"),
    )


@dataclass
class LossConfig:
    loss: str = _opt(
        "sigmoid",
        "preference loss, or several comma-separated (e.g. sigmoid,sft = RPO); default sigmoid (= dpo). One of: "
        "sigmoid, dpo, robust, hinge, ipo, exo_pair, nca_pair, bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, "
        "apo_down, discopop, sigmoid_norm, rdpo; reference-free (no reference model is built): sft, simpo, orpo",
    )
    loss_weights: str | None = _opt(
        None, "comma-separated weights, one per --loss entry, e.g. 1,0.5 (default: 1 for each loss)"
    )
    beta: float = _opt(
        0.1,
        "β (default 0.1): higher stays closer to the reference, lower aligns more aggressively; "
        "for simpo the papers use 2 to 2.5",
    )
    label_smoothing: float = _opt(
        0.0,
        "ε in [0, 0.5) (default 0): assumed fraction of flipped labels; used by sigmoid (conservative DPO), "
        "robust, aot, aot_unpaired, and exo_pair (which needs ε > 0, e.g. 1e-3)",
    )
    f_divergence: str = _opt(
        "reverse_kl",
        "divergence to the reference that scores the log-ratios (f-DPO); default reverse_kl is standard DPO; "
        "others apply to sigmoid, robust, hinge, ipo, exo_pair, discopop, sigmoid_norm, rdpo",
        choices=("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"),
    )
    alpha_divergence_coef: float = _opt(
        0.5, "α of --f-divergence alpha_divergence (default 0.5; 1 is reverse KL, toward 0 forward KL); must be > 0. "
        "TRL 1.16's parameterisation, f'(t) = (t^(α−1) − 1)/(α − 1); the f-DPO paper's (and older TRL's) "
        "α is 1 − this α",
    )
    discopop_tau: float = _opt(0.05, "τ of discopop: temperature of its logistic/exponential mix (default 0.05, the paper's)")
    simpo_gamma: float = _opt(0.5, "γ of simpo: target reward margin subtracted inside the sigmoid (default 0.5)")
    orpo_lambda: float = _opt(0.1, "λ of orpo: weight of the odds-ratio term next to the NLL (default 0.1, the paper's)")
    rdpo_alpha: float = _opt(
        0.01, "α of rdpo: length penalty per token of the chosen-minus-rejected length difference (default 0.01)"
    )


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
    save_every: int | None = _opt(None, "write a checkpoint every N steps (one is always written at the end)")
    keep_checkpoints: int = _opt(2, "keep only the newest K checkpoints")
    resume: str | None = _opt(
        None, "continue a run: auto (newest checkpoint in --output, if any) or a checkpoint folder"
    )
    skip_nonfinite: bool = _opt(False, "skip (and count) a step whose loss or gradient is not finite, instead of stopping")


@dataclass
class LoraSection:
    """LoRA adapters through peft; named so as not to shadow peft's own LoraConfig."""

    lora_r: int = _opt(0, "LoRA rank; 0 trains every weight, > 0 trains low-rank adapters only (peft)")
    lora_alpha: float = _opt(16.0, "LoRA α: the adapter's update is scaled by α / r")
    lora_dropout: float = _opt(0.0, "dropout on the adapters' input (0 keeps DPO's log-ratios deterministic)")
    lora_target_modules: str = _opt(
        "all-linear", "modules that get adapters: all-linear (every linear layer but the LM head) or "
        "comma-separated names, e.g. q_proj,v_proj"
    )
    load_in_4bit: bool = _opt(False, "QLoRA: load the frozen base weights in 4-bit NF4 (bitsandbytes; CUDA only)")


@dataclass
class ScaleConfig:
    parallel: str = _opt(
        "ddp", "strategy when launched with torchrun: ddp (replicate the model) or fsdp (FSDP2: shard "
        "weights, gradients and optimizer state per transformer block)", choices=("ddp", "fsdp"),
    )
    fsdp_cpu_offload: bool = _opt(False, "with --parallel fsdp: keep the sharded weights and optimizer state in CPU memory")
    gradient_checkpointing: bool = _opt(
        False, "recompute activations in the backward pass instead of storing them (less memory, roughly a third more compute)"
    )
    activation_offload: bool = _opt(
        False, "keep the activations saved for backward in pinned CPU memory instead of GPU memory "
        "(torch.autograd.graph.save_on_cpu; CUDA only: on the CPU they are in CPU memory already)"
    )


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
    attention: str = _opt(
        "auto",
        "attention of packed and prefix-shared rows: segments (each sequence through SDPA's fused causal "
        "kernel: no [T x T] mask, memory linear in length), masks (a [T x T] mask per row), or auto "
        "(segments where exact for the model, else masks, with one log line)",
        choices=("auto", "segments", "masks"),
    )
    reference: str = _opt(
        "auto",
        "reference log-probs: precomputed (one no-grad pass before training, cached on disk), live (a "
        "frozen copy of the model), or auto (precomputed)",
        choices=("auto", "precomputed", "live"),
    )
    reference_cache: str | None = _opt(
        None, "folder of cached reference log-probs (default: <output>/reference-cache); share one across a sweep"
    )
    compile: bool = _opt(False, "torch.compile the model body (slow first steps; helps most on GPU)")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def global_batch_size(self) -> int:
        """Pairs per optimizer step in one process; the loop multiplies by the world size."""
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
        if kind in ("int", "float") and isinstance(value, bool):
            raise ValueError  # YAML's true/false are ints to Python, never a count or a rate
        if kind == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value) if not isinstance(value, str) else int(float(value)) if "e" in value.lower() else int(value)
        if kind == "float":
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise DpokitError(f"{where}: expected {kind}, got {value!r}") from None


def load_yaml(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read a YAML config; sections as in RunConfig, or flat option names at the top level."""
    path = Path(path)
    if path.is_dir():
        raise DpokitError(f"config file {path} is a folder; give --config a YAML file")
    if not path.is_file():
        raise DpokitError(f"config file {path} does not exist")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8-sig"), Loader=_strict_loader(path)) or {}
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
                _set_once(values, key, sub, coerce(subvalue, names[sub], f"{_at(path, sub)}: {key}.{sub}"),
                          f"{_at(path, sub)}: {key}.{sub}")
        elif key.replace("-", "_") in by_name:
            section, f = by_name[key.replace("-", "_")]
            _set_once(values, section, f.name, coerce(value, f, f"{_at(path, key)}: {key}"), f"{_at(path, key)}: {key}")
        else:
            raise DpokitError(f"{path}: unknown option '{key}'")
    return values


def _set_once(values: dict[str, dict[str, Any]], section: str, name: str, value: Any, where: str) -> None:
    """A flat key and its section form (`beta:` and `loss: {beta:}`) name one option: one value."""
    if name in values.get(section, {}):
        raise DpokitError(f"{where}: {section}.{name} is already set in this file; keep one")
    values.setdefault(section, {})[name] = value


class _Key(str):
    """A YAML mapping key that remembers its line, for messages."""

    line: int = 0


def _at(path: Path, key: Any) -> str:
    return f"{path} line {key.line}" if getattr(key, "line", 0) else str(path)


def _strict_loader(path: Path) -> type:
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one
    silently) and records each key's line."""

    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                line = key_node.start_mark.line + 1
                if isinstance(key, str) and key in seen:
                    raise DpokitError(f"{path} line {line}: '{key}' is given twice (first on line {seen[key]}); "
                                      "keep one")
                if isinstance(key, str):
                    seen[key] = line
            mapping = super().construct_mapping(node, deep=deep)
            lines = {key: seen[key] for key in mapping if isinstance(key, str)}
            return {_with_line(key, lines.get(key)): value for key, value in mapping.items()}

    return StrictLoader


def _with_line(key: Any, line: int | None) -> Any:
    if not isinstance(key, str) or line is None:
        return key
    tagged = _Key(key)
    tagged.line = line
    return tagged


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
        "--log-every": t.log_every,
        "--epochs": t.epochs,
    }
    for flag, value in positive.items():
        if not (value > 0 and math.isfinite(value)):
            raise DpokitError(f"{flag} must be a positive number; got {value}")
    validate_data(d)
    for flag, value in {
        "--max-steps": t.max_steps,
        "--eval-every": t.eval_every,
        "--max-grad-norm": t.max_grad_norm,
        "--save-every": t.save_every,
    }.items():
        if value is not None and not value > 0:
            raise DpokitError(f"{flag} must be positive (or none); got {value}")
    for flag, value in {"--pack-length": config.speed.pack_length, "--lm-head-chunk": config.speed.lm_head_chunk}.items():
        if value < 0:
            raise DpokitError(f"{flag} must be >= 0 (0: automatic); got {value}")
    check_loss_config(lo)  # every loss option, --label-smoothing's range included
    if t.warmup_steps < 0 or not 0.0 <= t.warmup_ratio < 1.0:
        raise DpokitError("--warmup-steps must be >= 0 and --warmup-ratio in [0, 1)")
    if t.keep_checkpoints < 1:
        raise DpokitError(f"--keep-checkpoints must be at least 1; got {t.keep_checkpoints}")
    if t.weight_decay < 0:
        raise DpokitError(f"--weight-decay must be >= 0; got {t.weight_decay}")
    for flag, value in {"--adam-beta1": t.adam_beta1, "--adam-beta2": t.adam_beta2}.items():
        if not 0.0 <= value < 1.0:
            raise DpokitError(f"{flag} must be in [0, 1); got {value}")
    _validate_lora(config)


def _validate_lora(config: RunConfig) -> None:
    lo = config.lora
    if lo.lora_r < 0:
        raise DpokitError(f"--lora-r must be >= 0 (0: no LoRA); got {lo.lora_r}")
    if lo.lora_r and not (lo.lora_alpha > 0 and math.isfinite(lo.lora_alpha)):
        raise DpokitError(f"--lora-alpha must be a positive number; got {lo.lora_alpha}")
    if not 0.0 <= lo.lora_dropout < 1.0:
        raise DpokitError(f"--lora-dropout must be in [0, 1); got {lo.lora_dropout}")
    if lo.lora_r and not [m for m in lo.lora_target_modules.split(",") if m.strip()]:
        raise DpokitError("--lora-target-modules is empty; use all-linear or names such as q_proj,v_proj")
    if lo.load_in_4bit and not lo.lora_r:
        raise DpokitError("--load-in-4bit needs --lora-r > 0: 4-bit base weights cannot be trained, only adapters")
    if config.scale.fsdp_cpu_offload and config.scale.parallel != "fsdp":
        raise DpokitError("--fsdp-cpu-offload applies to --parallel fsdp only")
    if lo.load_in_4bit and config.scale.parallel == "fsdp":
        raise DpokitError("--load-in-4bit works with --parallel ddp only (FSDP2 cannot shard 4-bit weights here)")


def validate_data(d: DataConfig) -> None:
    """The data section alone (shared by `train` and `data inspect`)."""
    from dpokit.data.pairs import parse_columns
    from dpokit.data.templates import parse_template_kwargs

    if not d.max_length > 0:
        raise DpokitError(f"--max-length must be a positive number; got {d.max_length}")
    if d.max_prompt_length is not None and not d.max_prompt_length > 0:
        raise DpokitError(f"--max-prompt-length must be positive (or none); got {d.max_prompt_length}")
    if d.max_prompt_length is not None and d.max_prompt_length >= d.max_length:
        raise DpokitError(
            f"--max-prompt-length ({d.max_prompt_length}) must be below --max-length ({d.max_length})"
        )
    if not 0.0 <= d.min_response_share < 1.0:
        raise DpokitError(f"--min-response-share must be in [0, 1); got {d.min_response_share}")
    parse_columns(d.columns)
    parse_template_kwargs(d.chat_template_kwargs)


def with_absolute_model_paths(config: RunConfig) -> RunConfig:
    """A copy whose local model, tokenizer and reference paths are absolute (hub ids stay as given),
    so the run folder's dpokit_config.yaml still names them when read from another directory."""

    def resolved(name: str | None) -> str | None:
        if not name:
            return name
        path = Path(name).expanduser()
        return str(path.resolve()) if path.exists() else name

    model = dataclasses.replace(config.model, model=resolved(config.model.model),
                                tokenizer=resolved(config.model.tokenizer),
                                reference_model=resolved(config.model.reference_model))
    return dataclasses.replace(config, model=model)


def dump_yaml(config: RunConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


# --- Sections of the sampling, evaluation and sweep commands -------------------------------
# They are not part of RunConfig (a training run does not sample), but follow its rules: one
# dataclass field per option, names unique across every section, flags derived from the names
# (`flag` in the metadata overrides the derived flag where the command line wants a short name).


@dataclass
class SamplingConfig:
    num_samples: int = _opt(1, "completions drawn per prompt")
    temperature: float = _opt(1.0, "sampling temperature; 0 = greedy decoding")
    top_p: float = _opt(1.0, "nucleus sampling: keep the most likely tokens up to this probability mass (1 = off)")
    top_k: int = _opt(0, "sample among the k most likely tokens only (0 = off)")
    max_new_tokens: int = _opt(64, "most tokens generated per completion; generation also stops at EOS")
    sample_seed: int = _opt(0, "sampling seed: same seed, prompts and settings give the same completions")
    sample_batch_size: int = _opt(16, "sequences generated (and scored) per forward pass")

    def is_ancestral(self) -> bool:
        """True when completions are drawn from the model's own distribution, unmodified."""
        return self.temperature == 1.0 and self.top_p == 1.0 and self.top_k == 0


@dataclass
class JudgeConfig:
    prompts: str | None = _opt(
        None, "JSON Lines file of prompts: rows with a 'prompt' field (text or chat messages); preference files work too"
    )
    max_prompts: int | None = _opt(None, "use only the first N prompts of --prompts (default: all)")
    judge: str | None = _opt(
        None, "scores (prompt, response): 'sentiment' (VADER), 'module:function', or a reward-model folder"
    )
    judge_batch_size: int = _opt(16, "responses scored per call of the judge")


@dataclass
class SweepConfig:
    betas: str = _opt("0.01,0.05,0.1,0.3,1", "comma-separated β values, one training run each", flag="--beta")
    losses: str = _opt(
        "sigmoid", "the loss of each run, as in train (sigmoid,sft is one combined loss, weighted by --loss-weights); "
        "give --loss again to sweep several losses, each trained at every β", flag="--loss")


@dataclass
class OnlineConfig:
    rounds: int = _opt(3, "rounds of: sample from the current policy, judge, pair, DPO-train, evaluate")
    samples_per_prompt: int = _opt(4, "K responses sampled per prompt in each round, to pair (at least 2)")
    pairing: str = _opt(
        "best_worst", "how each prompt's K judged samples become pairs: best_worst (one pair: the best over the "
        "worst) or all (every two with different scores, the higher one chosen)", choices=("best_worst", "all"),
    )
    eval_prompts: str | None = _opt(
        None, "JSON Lines prompts to evaluate each round on, kept apart from training (default: --prompts)"
    )


@dataclass
class DemoConfig:
    demo_output: str = _opt("demo-output", "folder for the demo's files (default: demo-output)", flag="--output")
    quick: bool = _opt(False, "a smoke version in under a minute: fewer prompts, one β, short runs")
    full: bool = _opt(False, "a bigger run: more prompts and samples, five β, longer runs, four online rounds")
    online: bool = _opt(True, "also run online DPO rounds (continuing the DPO run at the largest β), on the same frontier")
    demo_seed: int = _opt(0, "seed of the prompts, the sampling and the training", flag="--seed")


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


def parse_number_list(text: str, flag: str, kind: type = float) -> list:
    """'0.01, 0.1,1' -> [0.01, 0.1, 1.0], with a one-line error naming the option."""
    items = [part.strip() for part in str(text).split(",") if part.strip()]
    if not items:
        raise DpokitError(f"{flag}: expected a comma-separated list, got {text!r}")
    try:
        return [kind(item) for item in items]
    except ValueError:
        raise DpokitError(f"{flag}: expected comma-separated {kind.__name__} values, got {text!r}") from None


@dataclass
class SampleCommandConfig:
    prompt: str | None = _opt(None, "one prompt to complete (or use --prompts for a file)")
    samples_output: str | None = _opt(
        None, "JSON Lines file of {prompt, completions} rows, streamed as prompts finish (default: print)",
        flag="--output",
    )


@dataclass
class EvaluateCommandConfig:
    json_output: bool = _opt(False, "print the figures as one JSON object instead of a table", flag="--json")
    evaluation_output: str | None = _opt(None, "also write the figures as JSON to this file", flag="--output")
