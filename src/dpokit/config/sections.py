"""One tree of dataclasses holds every setting of a run.

Precedence, lowest first: the defaults below, a YAML file (`--config`), then CLI flags. Every
field carries its help text in `metadata["help"]`; the CLI builds its flags from these fields,
so `--help`, YAML and the code can never disagree. The resolved tree is written into the run
folder as `dpokit_config.yaml`. List options (`--loss`, `--loss-weights`,
`--lora-target-modules`) are tuples here, parsed once when a value is given.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from dpokit.config.choices import (
    ATTENTION_KINDS,
    BATCH_LAYOUTS,
    DATA_FORMATS,
    DTYPES,
    F_DIVERGENCES,
    LM_HEADS,
    LOSS_KINDS,
    LR_SCHEDULERS,
    PARALLEL_STRATEGIES,
    PROGRESS_MODES,
    REFERENCE_MODES,
    TRACKERS,
    TRUNCATION_MODES,
    TURN_MODES,
    losses_where,
)
from dpokit.config.fields import INPUT, OUTPUT, format_value, option, section


@section
class ModelConfig:
    model: str | None = option(None, "policy to train: a local Hugging Face model folder, a hub id, or a "
                                      ".gguf file (dequantized to float32) (required)", path=INPUT)
    tokenizer: str | None = option(None, "tokenizer folder, hub id or .gguf file (default: the model's)", path=INPUT)
    reference_model: str | None = option(
        None, "reference model folder, hub id or .gguf file (default: a frozen copy of the initial policy)", path=INPUT
    )
    dtype: str = option(
        "fp32",
        "compute precision: fp32; bf16 autocast; or fp16 autocast with dynamic loss scaling. Weights, "
        "gradients and optimizer state stay float32 in every case",
        choices=DTYPES,
    )
    device: str = option("auto", "device: auto (CUDA when present, else CPU), cpu, cuda, cuda:N")
    trust_remote_code: bool = option(False, "allow a hub model to run its own Python code (off by default)")


@section
class DataConfig:
    data: str | None = option(
        None,
        "training pairs: a .jsonl/.json/.csv/.parquet file, a datasets.save_to_disk folder (FOLDER[:SPLIT]) "
        "or a hub dataset ORG/NAME[:SPLIT] or ORG/NAME:CONFIG:SPLIT (required); .jsonl.gz/.json.gz are read compressed",
        path=INPUT,
    )
    data_config: str | None = option(
        None, "hub datasets only: the configuration to load (as in ORG/NAME:CONFIG:SPLIT), for --data and --eval-data"
    )
    data_dir: str | None = option(None, "hub datasets only: the folder inside the dataset repository to load (data_dir)")
    eval_data: str | None = option(None, "held-out pairs (any source --data takes), evaluated every --eval-every steps",
                                   path=INPUT)
    data_format: str = option(
        "auto",
        "row layout: auto (detected from the first row), standard (prompt/chosen/rejected strings), implicit "
        "(chosen/rejected HH-RLHF transcripts), conversational (message lists), sharegpt (conversations + from/value)",
        choices=("auto", *DATA_FORMATS),
    )
    columns: str | None = option(
        None, "rename columns first: prompt=question,chosen=good,rejected=bad (a dotted COLUMN reaches a nested "
        "field: score_chosen=meta.score)"
    )
    chat_template: str | None = option(
        None, "Jinja chat template file for conversational data (default: the tokenizer's own template)", path=INPUT
    )
    chat_template_kwargs: str | None = option(
        None, "JSON object of extra chat template arguments, e.g. '{\"enable_thinking\": false}'; a row's "
        "chat_template_kwargs column overrides it key by key"
    )
    train_on_turns: str = option(
        "last", "conversations: last (the loss covers the last assistant turn; chosen and rejected must share "
        "everything before it) or all (every assistant turn from the first one where they differ); in both, "
        "only the assistant's tokens are in the loss (tool results and user turns are context)", choices=TURN_MODES,
    )
    strict: bool = option(
        False, "fail on the first bad row (empty or identical responses, wrong types, ...) instead of skipping it"
    )
    drop_tied_scores: bool = option(False, "skip pairs whose score_chosen equals score_rejected (when scores exist)")
    max_length: int = option(1024, "most tokens in prompt + response; longer pairs are truncated (see docs/training.md)")
    max_prompt_length: int | None = option(
        None, "when a pair is too long, first cut its prompt to this many tokens (default: only as much as "
        "--min-response-share needs)"
    )
    min_response_share: float = option(
        0.25, "when a pair is too long and --max-prompt-length is not set, cut the prompt so the longer response "
        "keeps this share of --max-length (all of it when shorter); 0: never cut prompts, drop a pair whose "
        "prompt alone fills --max-length (default 0.25)"
    )
    truncation_mode: str = option(
        "keep_end", "how a prompt is cut: keep_end (drop its start, keep BOS) or keep_start (drop its end); "
        "responses are always cut from the right", choices=TRUNCATION_MODES,
    )


@section
class LossConfig:
    loss: tuple[str, ...] = option(
        ("sigmoid",),
        "preference loss, or several comma-separated (e.g. sigmoid,sft = RPO); default sigmoid (= dpo). One of: "
        f"{', '.join(losses_where('needs_reference'))}; reference-free (no reference model is built): "
        f"{', '.join(name for name, kind in LOSS_KINDS.items() if not kind.needs_reference)}",
    )
    loss_weights: tuple[float, ...] | None = option(
        None, "comma-separated weights, one per --loss entry, e.g. 1,0.5 (default: 1 for each loss)"
    )
    beta: float = option(
        0.1,
        "β (default 0.1): higher stays closer to the reference, lower aligns more aggressively; "
        "for simpo the papers use 2 to 2.5",
    )
    sync_reference_steps: int = option(
        0, "τ of TR-DPO: after every τ-th optimizer step the reference moves toward the policy, "
        "θ_ref ← α·θ + (1 − α)·θ_ref (TRL's ref_model_sync_steps, 512 there); needs a live reference, which "
        "--reference auto then picks; 0 keeps the reference fixed (default 0)",
    )
    sync_reference_alpha: float = option(
        0.6, "α of TR-DPO, in (0, 1]: the policy's share in each reference update (default 0.6, TRL's "
        "ref_model_mixup_alpha); 1 copies the policy (the paper's hard update)",
    )
    label_smoothing: float = option(
        0.0,
        "ε in [0, 0.5) (default 0): assumed fraction of flipped labels (sigmoid with ε > 0 is conservative DPO); "
        f"used by {', '.join(losses_where('uses_label_smoothing'))}; exo_pair needs ε > 0, e.g. 1e-3",
    )
    f_divergence: str = option(
        "reverse_kl",
        "divergence to the reference that scores the log-ratios (f-DPO); default reverse_kl is standard DPO; "
        f"others apply to {', '.join(n for n in losses_where('f_divergence') if LOSS_KINDS[n].needs_reference)}",
        choices=F_DIVERGENCES,
    )
    alpha_divergence_coef: float = option(
        0.5, "α of --f-divergence alpha_divergence (default 0.5; 1 is reverse KL, toward 0 forward KL); must be > 0. "
        "TRL 1.16's parameterisation, f'(t) = (t^(α−1) − 1)/(α − 1); the f-DPO paper's (and older TRL's) "
        "α is 1 − this α",
    )
    discopop_tau: float = option(0.05, "τ of discopop: temperature of its logistic/exponential mix (default 0.05, the paper's)")
    simpo_gamma: float = option(0.5, "γ of simpo: target reward margin subtracted inside the sigmoid (default 0.5)")
    orpo_lambda: float = option(0.1, "λ of orpo: weight of the odds-ratio term next to the NLL (default 0.1, the paper's)")
    rdpo_alpha: float = option(
        0.01, "α of rdpo: length penalty per token of the chosen-minus-rejected length difference (default 0.01)"
    )
    dpop_lambda: float = option(
        50.0, "λ of dpop: weight of the penalty max(0, ref_c − π_c) inside DPO's sigmoid (default 50, the paper's)"
    )
    beta_dpo_alpha: float = option(
        0.6, "α of beta_dpo: β of a batch = β·(1 + α·(mean margin of its kept pairs − running mean margin)) "
        "(default 0.6); 0 keeps β fixed"
    )
    beta_dpo_rho: float = option(
        0.8, "ρ of beta_dpo: fraction of each batch's pairs kept, those whose margin lies nearest the running "
        "mean (the centre of the Gaussian fitted to margins); default 0.8, 1 keeps all"
    )
    wpo: bool = option(
        False, "WPO: weight each pair's loss by w_c·w_r, w = exp(mean over the response of log p(token) − "
        "log Σ_v p(v)²), the policy's own length-normalised probability of the response, taken without gradient "
        "(TRL's use_weighting); default off; any loss but the batch-sorting aot, aot_unpaired"
    )
    ld_alpha: float | None = option(
        None, "α of LD-DPO in [0, 1]: the response tokens past the pair's shorter response count α times in the "
        "policy and reference log-probs (TRL's ld_alpha; 1 is plain DPO, 0 drops them); default none: off. Not with the "
        "losses that average log-probs per token already (ipo, sigmoid_norm, sft, simpo, orpo)"
    )
    router_aux_loss_coef: float | None = option(
        None, "Mixture-of-Experts models: weight of the router's load-balancing loss added to the training loss "
        "(TRL's router_aux_loss_coef; logged as aux_loss); default: the coefficient the model's own forward "
        "applies (e.g. 0.001 for Mixtral, 0.01 for OLMoE); 0: off. An error on a model without a router"
    )

    @property
    def loss_spec(self) -> str:
        """The loss as the command line writes it: sigmoid,sft."""
        return format_value(self.loss)


@section
class TrainConfig:
    output: str | None = option(None, "run folder: final model, tokenizer, config and metrics.jsonl (required)",
                                path=OUTPUT)
    overwrite: bool = option(False, "replace the dpokit run in --output (kept until the new run's first checkpoint; "
                             "a folder of other files is never replaced)")
    learning_rate: float = option(5e-7, "peak AdamW learning rate")
    allow_large_learning_rate: bool = option(
        False, "take a --learning-rate above 1 as given (refused otherwise, as a likely typo: 1e6 for 1e-6)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    adam_beta1: float = option(0.9, "AdamW β1")
    adam_beta2: float = option(0.999, "AdamW β2")
    adam_epsilon: float = option(1e-8, "AdamW ε")
    batch_size: int = option(8, "pairs per forward pass (each pair is two rows: chosen and rejected)")
    gradient_accumulation_steps: int = option(1, "forward passes per optimizer step")
    epochs: float = option(1.0, "passes over the training data (ignored when --max-steps is set)")
    max_steps: int | None = option(None, "optimizer steps to run (overrides --epochs)")
    warmup_steps: int = option(0, "steps of linear learning-rate warm-up from 0")
    warmup_ratio: float = option(0.0, "warm-up as a fraction of all steps (used when --warmup-steps is 0)")
    lr_scheduler: str = option(
        "cosine", "learning-rate decay after warm-up (toward 0 at the end)", choices=LR_SCHEDULERS
    )
    max_grad_norm: float | None = option(1.0, "clip the gradient's global L2 norm to this (none: no clipping)")
    seed: int = option(42, "seed for initialisation, data order and dropout")
    eval_every: int | None = option(None, "evaluate on --eval-data every N steps (default: only at the end)")
    log_every: int = option(1, "average metrics over N steps and write one metrics.jsonl line")
    progress: str = option("auto", "progress bar: auto (when a terminal), on, off", choices=PROGRESS_MODES)
    save_every: int | None = option(None, "write a checkpoint every N steps (one is always written at the end)")
    keep_checkpoints: int = option(2, "keep only the newest K checkpoints")
    resume: str | None = option(
        None, "continue a run: auto (newest checkpoint in --output, if any) or a checkpoint folder", path=INPUT
    )
    skip_nonfinite: bool = option(False, "skip (and count) a step whose loss or gradient is not finite, instead of stopping")
    report_to: tuple[str, ...] = option(
        ("none",), f"experiment trackers that receive every metrics.jsonl figure: none, or a comma list of "
        f"{', '.join(TRACKERS)} (each needs its extra, e.g. pip install 'dpokit[mlflow]')"
    )
    push_to_hub: str | None = option(
        None, "after training, upload the run folder (model, tokenizer, model card) to this Hub repository, "
        "e.g. your-name/model (checked before training starts)"
    )
    hub_private: bool = option(False, "create the --push-to-hub repository as private")


@section
class LoraSection:
    """LoRA adapters through peft; named so as not to shadow peft's own LoraConfig."""

    lora_r: int = option(0, "LoRA rank; 0 trains every weight, > 0 trains low-rank adapters only (peft)")
    lora_alpha: float = option(16.0, "LoRA α: the adapter's update is scaled by α / r")
    lora_dropout: float = option(0.0, "dropout on the adapters' input (0 keeps DPO's log-ratios deterministic)")
    lora_target_modules: tuple[str, ...] = option(
        ("all-linear",), "modules that get adapters: all-linear (every linear layer but the LM head) or "
        "comma-separated names, e.g. q_proj,v_proj"
    )
    load_in_4bit: bool = option(False, "QLoRA: load the frozen base weights in 4-bit NF4 (bitsandbytes; CUDA only)")


@section
class ScaleConfig:
    parallel: str = option(
        "ddp", "strategy when launched with torchrun: ddp (replicate the model) or fsdp (FSDP2: shard "
        "weights, gradients and optimizer state per transformer block)", choices=PARALLEL_STRATEGIES,
    )
    fsdp_cpu_offload: bool = option(False, "with --parallel fsdp: keep the sharded weights and optimizer state in CPU memory")
    gradient_checkpointing: bool = option(
        False, "recompute activations in the backward pass instead of storing them (less memory, roughly a third more compute)"
    )
    selective_recompute: bool = option(
        False, "keep only the matmul and attention outputs for the backward pass and recompute the elementwise work "
        "(norms, rotary embeddings, activations) from them: about half the saved activations (SmolLM2-135M on the CPU: "
        "peak RSS -26 to -30 percent at about the same speed), same gradients (model/recompute.py). An alternative to "
        "--gradient-checkpointing, which saves more and recomputes the matmuls too"
    )
    activation_offload: bool = option(
        False, "keep the activations saved for backward in pinned CPU memory instead of GPU memory "
        "(torch.autograd.graph.save_on_cpu; CUDA only: on the CPU they are in CPU memory already)"
    )
    malloc_mmap_threshold: str = option(
        "auto", "glibc (Linux) only: from the start of training, freed host memory blocks of at least this "
        "many bytes go back to the system instead of staying in the process (malloc's mmap threshold, "
        "fixed). auto (default): 1 MiB on the CPU when the data's longest sequence is at least 3072 tokens "
        "(4k-token pairs: about 0.55x the peak RSS, for more system time), 8 MiB on the CPU with "
        "--gradient-checkpointing for shorter rows (SmolLM2-135M, peak RSS: -10 percent at 768 tokens at the same "
        "speed, -22 percent at 2048 for 5 percent fewer pairs/s), malloc's adaptive threshold otherwise (short rows without checkpointing only pay "
        "for it: the demo at 1 MiB took 30 percent more CPU); 0: always adaptive; N: N bytes"
    )
    memory_budget: str | None = option(
        None, "plan the run to fit this much memory (8GiB, 1500MB, or auto: the GPU's free memory on CUDA, 80 percent "
        "of MemAvailable on the CPU): before training, probes one step on the data's longest pairs in a child process "
        "and picks the largest micro-batch (accumulation keeps the global batch) and the cheapest of gradient "
        "checkpointing, activation offload (CUDA) and the malloc threshold (CPU) that fit; refused in one line when "
        "nothing fits (docs/memory-budget.md). Default: none, the run as configured"
    )


@section
class SpeedConfig:
    layout: str = option(
        "auto",
        "batch layout: padded, packed (padding-free), prefix-shared (each prompt computed once per pair), "
        "or auto (one per run: the cheaper of packed and prefix-shared over its first epoch's batches by a "
        "token and attention cost model)",
        choices=("auto", *BATCH_LAYOUTS),
    )
    pack_length: int = option(0, "packed rows hold at least this many tokens (0: the batch's longest block)")
    lm_head: str = option(
        "auto",
        "LM head: chunked (logits a chunk of positions at a time, recomputed in backward), plain (the "
        "model's full logits), or auto (chunked when exact for the model)",
        choices=LM_HEADS,
    )
    lm_head_chunk: int = option(0, "positions per LM-head chunk (0: 4M elements / vocabulary size, at least 16)")
    attention: str = option(
        "auto",
        "attention of packed and prefix-shared rows: segments (each sequence through SDPA's fused causal "
        "kernel: no [T x T] mask, memory linear in length), masks (a [T x T] mask per row), or auto "
        "(segments for a run whose batches' masks could reach 2^24 cells, where exact for the model, else "
        "masks; one choice per run; a model that cannot take segments gets one log line)",
        choices=ATTENTION_KINDS,
    )
    reference: str = option(
        "auto",
        "reference log-probs: precomputed (one no-grad pass before training, cached on disk), live (a "
        "frozen copy of the model), or auto (precomputed)",
        choices=REFERENCE_MODES,
    )
    reference_cache: str | None = option(
        None, "folder of cached reference log-probs (default: <output>/reference-cache); share one across a sweep",
        path=OUTPUT,
    )
    compile: bool = option(False, "torch.compile the model body (slow first steps; helps most on GPU)")


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
        """Plain data (lists for the list options), as dpokit_config.yaml holds it."""
        return {name: {key: list(value) if isinstance(value, tuple) else value for key, value in values.items()}
                for name, values in dataclasses.asdict(self).items()}


def section_classes() -> dict[str, type]:
    """Section name -> dataclass, in declaration order."""
    return {f.name: type(getattr(RunConfig(), f.name)) for f in dataclasses.fields(RunConfig)}


def iter_options() -> list[tuple[str, dataclasses.Field]]:
    """Every (section, field) pair; field names are unique across sections so flags stay flat."""
    out = []
    for name, cls in section_classes().items():
        out.extend((name, f) for f in dataclasses.fields(cls))
    return out

