"""Load the policy, its tokenizer and the frozen reference; pick the device and precision."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch

from dpokit.errors import DpokitError


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
    """Fail with one line when a local model path is missing or is not a model folder."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise DpokitError(f"{what} path {name} is not a Hugging Face model folder (no config.json)")
    elif _looks_like_path(name):
        raise DpokitError(f"{what} path {name} does not exist")


def load_tokenizer(name: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    check_model_source(name, "tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise DpokitError(f"could not load tokenizer '{name}': {_first_line(exc)}") from None
    if tokenizer.pad_token_id is None:
        # Padding is masked everywhere; any id will do, and EOS is always there.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_policy(name: str, device: torch.device, trust_remote_code: bool = False) -> torch.nn.Module:
    """Load a causal LM with float32 master weights on `device`, dropout disabled."""
    from transformers import AutoModelForCausalLM

    check_model_source(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name, dtype=torch.float32, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise DpokitError(f"could not load model '{name}': {_first_line(exc)}") from None
    disable_dropout(model)
    return model.to(device)


def frozen_reference(policy: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy of the initial policy: eval mode, no gradients, dropout disabled."""
    reference = copy.deepcopy(policy)
    reference.eval()
    reference.requires_grad_(False)
    return reference


def disable_dropout(model: torch.nn.Module) -> None:
    """Zero every dropout: DPO's log-ratios must be deterministic for policy and reference alike.

    Covers `nn.Dropout` modules and the float `*dropout*` attributes attention layers read
    directly (Llama's `attention_dropout`), so train mode (needed by gradient checkpointing)
    stays dropout-free. The model's config is left as it was, so the saved model keeps it.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)


def autocast_context(device: torch.device, dtype: str):
    """bf16 autocast around forward passes when asked; fp32 runs without autocast."""
    if dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return torch.autocast(device_type=device.type, enabled=False)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
