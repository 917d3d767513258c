"""Load the policy, its tokenizer and the reference; LoRA adapters; pick the device and precision."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError

from dpokit.config import LoraSection
from dpokit.errors import DpokitError, first_line
from dpokit.io import RUN_CONFIG_FILE, read_run_config
from dpokit.model.gguf import check_gguf_file, is_gguf, load_gguf_config, load_gguf_model, load_gguf_tokenizer
from dpokit.model.logprobs import model_body
from dpokit.model.recompute import check_selective_recompute, checkpoint_kwargs
from dpokit.paths import hub_unreachable, in_hub_cache


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DpokitError(f"--device: unknown device '{name}' (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DpokitError(f"--device {name}: CUDA is not available on this machine")
    return device


def _looks_like_path(name: str) -> bool:
    """Hub ids are `name` or `org/name`; anything else (./x, /x, ~/x, a/b/c) is a path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def check_model_source(name: str, what: str = "model") -> None:
    """Fail with one line when a local model path is missing or is not a model folder (or file:
    a GGUF)."""
    if is_gguf(name):
        check_gguf_file(name, what)
        return
    path = Path(name).expanduser()
    if path.exists():
        # A tokenizer folder (a LoRA run's, say) may hold tokenizer_config.json without config.json.
        markers = ("config.json", "tokenizer_config.json") if what == "tokenizer" else ("config.json",)
        if not path.is_dir() or not any((path / m).is_file() for m in markers):
            raise DpokitError(f"{what} path {name} is not a Hugging Face model folder (no config.json)")
    elif _looks_like_path(name):
        raise DpokitError(f"{what} path {name} does not exist")
    elif not in_hub_cache(name, "config.json" if what != "tokenizer" else "tokenizer_config.json") and (
            reason := hub_unreachable()):
        raise DpokitError(f"{what} {name}: no such folder; as a hub id: {reason}")


def load_tokenizer(name: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    check_model_source(name, "tokenizer")
    try:
        tokenizer = (load_gguf_tokenizer(name) if is_gguf(name)
                     else AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code))
    except (OSError, ValueError) as exc:
        raise DpokitError(f"could not load tokenizer '{name}': {first_line(exc)}") from None
    if tokenizer.pad_token_id is None:
        # Padding is masked everywhere; any id will do, and EOS is always there.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_policy(name: str, device: torch.device, trust_remote_code: bool = False,
                load_in_4bit: bool = False) -> torch.nn.Module:
    """Load a causal LM with float32 master weights on `device`, dropout disabled: a model folder,
    a hub id, a LoRA run folder (merged), or a GGUF file (dequantized to float32).

    `load_in_4bit` (QLoRA) loads the weights as 4-bit NF4 through bitsandbytes, on CUDA only.
    """
    from transformers import AutoModelForCausalLM

    if is_lora_run(name) and not load_in_4bit:
        return load_lora_run(Path(name).expanduser(), device, trust_remote_code)
    check_model_source(name)
    if is_gguf(name) and load_in_4bit:
        raise DpokitError(f"--load-in-4bit cannot load a GGUF file ({name}): export it to a model folder "
                          "first (dpokit export FILE.gguf --output FOLDER)")
    extra = _four_bit_options(device) if load_in_4bit else {}
    try:
        model = load_gguf_model(name) if is_gguf(name) else AutoModelForCausalLM.from_pretrained(
            name, dtype=torch.float32, trust_remote_code=trust_remote_code, **extra
        )
    except (OSError, ValueError) as exc:
        raise DpokitError(f"could not load model '{name}': {first_line(exc)}") from None
    except SafetensorError as exc:  # a truncated download or copy, or not a weights file at all
        raise DpokitError(f"model {name}: {_weights_file(name)} is damaged ({first_line(exc)}); "
                          "copy or download it again") from None
    disable_dropout(model)
    return model if load_in_4bit else model.to(device)  # 4-bit weights are placed by device_map


def load_model_config(name: str, trust_remote_code: bool = False):
    """The model's config without its weights (config.json, or a GGUF file's metadata); None when
    it cannot be read here (loading the model itself then reports why)."""
    from transformers import AutoConfig

    try:
        if is_gguf(name):
            return load_gguf_config(name)
        return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, DpokitError):
        return None


def _weights_file(name: str) -> str:
    folder = Path(name).expanduser()
    return str(folder / "model.safetensors") if (folder / "model.safetensors").is_file() else "a weights file"


def is_lora_run(name: str) -> bool:
    """A folder holding a LoRA adapter (a `--lora-r` run) rather than a whole model."""
    path = Path(name).expanduser()
    return (path / "adapter_config.json").is_file() and not (path / "config.json").is_file()


def load_lora_run(run: Path, device: torch.device, trust_remote_code: bool = False,
                  base: str | None = None) -> torch.nn.Module:
    """A LoRA run as a plain model: its base model (`base`, else the run's --model) with the adapter
    folded into the weights (peft's merge: W + B·A·α/r), so it samples and scores like any model."""
    from peft import PeftModel

    base = base or run_base_model(run)
    model = load_policy(base, device, trust_remote_code)
    return PeftModel.from_pretrained(model, str(run)).merge_and_unload()


def run_base_model(run: Path) -> str:
    """The base model a run was trained from: its resolved config's --model, else the adapter's record."""
    name = ((read_run_config(run) or {}).get("model") or {}).get("model")
    if name:
        return name
    name = json.loads((run / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not name:
        raise DpokitError(f"{run} does not say which base model its LoRA adapter belongs to (no {RUN_CONFIG_FILE}); "
                          "merge it with dpokit export --merge --base BASE")
    return name


def _four_bit_options(device: torch.device) -> dict:
    if device.type != "cuda":
        raise DpokitError("--load-in-4bit needs a CUDA GPU (bitsandbytes 4-bit); none is in use here")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise DpokitError("--load-in-4bit needs bitsandbytes: pip install bitsandbytes") from None
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    return {"quantization_config": quant, "device_map": {"": device}}


def prepare_policy(model: torch.nn.Module, lora: LoraSection, gradient_checkpointing: bool,
                   selective_recompute: bool = False) -> torch.nn.Module:
    """Add LoRA adapters (when --lora-r > 0) and gradient checkpointing, full or selective
    (model/recompute.py), to a loaded policy."""
    if gradient_checkpointing or selective_recompute:
        if not getattr(model, "supports_gradient_checkpointing", False):
            flag = "--gradient-checkpointing" if gradient_checkpointing else "--selective-recompute"
            raise DpokitError(f"{flag}: {type(model).__name__} does not support gradient checkpointing "
                              "(transformers runs no checkpointed layers for it); run without it")
        kwargs = checkpoint_kwargs(selective=not gradient_checkpointing)
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x renamed it
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if selective_recompute and not gradient_checkpointing:
            check_selective_recompute(model)
    if not lora.lora_r:
        return model
    from peft import LoraConfig, get_peft_model

    modules = lora.lora_target_modules  # a tuple, parsed when the config was loaded
    targets: str | list[str] = "all-linear" if modules == ("all-linear",) else list(modules)
    if getattr(model, "is_loaded_in_4bit", False):
        model.requires_grad_(False)  # the quantized base is frozen; only the adapters train
    config = LoraConfig(r=lora.lora_r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
                        target_modules=targets, task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise DpokitError(f"--lora-target-modules {','.join(modules)}: {first_line(exc)}") from None


def is_lora(model: torch.nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


class AdaptersDisabled:
    """The LoRA reference: the policy itself with its adapters switched off, so no second copy
    of the weights exists. Used like a model (`sequence_logps(reference, batch)` works in every
    layout, with the chunked LM head too: it has the model's config, output layer and body), only
    under `torch.no_grad()`. Holds the unwrapped peft model: FSDP2 shards it in place, and DDP's
    gradient hooks are not needed for a pass that computes no gradient."""

    def __init__(self, peft_model: torch.nn.Module):
        self.peft_model = peft_model
        self.base_model = _WithAdaptersOff(model_body(peft_model), peft_model)  # what the chunked head calls

    @property
    def config(self):
        return self.peft_model.config

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.peft_model.get_output_embeddings()

    def __call__(self, **inputs):
        with self.peft_model.disable_adapter():
            return self.peft_model(**inputs)


class _WithAdaptersOff(torch.nn.Module):
    """Runs `module` (a part of `peft_model`) with the peft model's adapters switched off."""

    def __init__(self, module: torch.nn.Module, peft_model: torch.nn.Module):
        super().__init__()
        self.module = module
        self._switch = peft_model.disable_adapter  # a bound method: peft_model is not registered twice

    def forward(self, **inputs):
        with self._switch():
            return self.module(**inputs)


def build_reference(policy: torch.nn.Module, needed: bool):
    """The live reference: None when the loss needs none, the policy with adapters disabled under
    LoRA, otherwise a frozen copy of the initial policy. Call before `parallelize`."""
    if not needed:
        return None
    return AdaptersDisabled(policy) if is_lora(policy) else frozen_reference(policy)


def frozen_reference(policy: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy of the initial policy: eval mode, no gradients, dropout disabled."""
    reference = copy.deepcopy(policy)
    reference.eval()
    reference.requires_grad_(False)
    return reference


def disable_dropout(model: torch.nn.Module) -> None:
    """Zero every dropout: DPO's log-ratios must be deterministic for policy and reference alike.

    Covers `nn.Dropout` modules, the float `*dropout*` attributes attention layers read directly
    (Llama's `attention_dropout`), and the config's float `*dropout*` / `*pdrop*` fields that some
    models read at forward time (Falcon's `hidden_dropout`, Persimmon, MPT's `attn_config`), so
    train mode (needed by gradient checkpointing) stays dropout-free. The saved config therefore
    records dropout 0, as the model was trained.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            _zero_config_dropout(config, set())


def _zero_config_dropout(config, seen: set[int]) -> None:
    """Zero the float dropout fields of a (transformers) config and of its sub-configs."""
    if id(config) in seen:
        return
    seen.add(id(config))
    for name, value in list(vars(config).items()):
        if ("dropout" in name or "pdrop" in name) and isinstance(value, float):
            setattr(config, name, 0.0)
        elif hasattr(value, "to_dict") and not isinstance(value, torch.nn.Module):  # text_config, attn_config
            _zero_config_dropout(value, seen)


def autocast_context(device: torch.device, dtype: str):
    """bf16 or fp16 autocast around forward passes when asked; fp32 runs without autocast.

    Weights stay float32 (the master copy the optimizer updates); autocast casts them per op.
    """
    if dtype in ("bf16", "fp16"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if dtype == "bf16" else torch.float16)
    return torch.autocast(device_type=device.type, enabled=False)

