"""`dpokit export`: a trained run folder -> a standalone Hugging Face model folder."""

from __future__ import annotations

from pathlib import Path

import torch

from dpokit.errors import DpokitError
from dpokit.io import atomic_save_pretrained
from dpokit.model.gguf import is_gguf
from dpokit.model.load import load_lora_run, load_policy, load_tokenizer, run_base_model
from dpokit.model_card import write_model_card
from dpokit.paths import check_creatable, check_outputs_apart, clear_for_overwrite


def export_model(run: str | Path, output: str | Path, merge: bool, base: str | None = None,
                 dtype: str = "fp32", overwrite: bool = False) -> Path:
    """Write a trained run as a standalone Hugging Face model folder (model + tokenizer); a GGUF
    model file is written the same way, dequantized (float32 unless `dtype` says otherwise).

    A LoRA run holds only its adapter; `merge` loads the base model (`base`, else the run's
    --model), adds the adapter and folds it into the base weights (W + B·A·α/r), so the result
    loads with `AutoModelForCausalLM.from_pretrained` and no peft.
    """
    run, output = Path(run), Path(output)
    if not run.is_dir() and not is_gguf(run):
        raise DpokitError(f"export: {run} is not a folder (nor a .gguf model file)")
    check_outputs_apart([("--output", output)], [("RUN", run), ("--base", base)])
    check_creatable(output, "export: --output")
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise DpokitError(f"export: --output {output} is not empty; pass --overwrite or choose a new folder")
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    adapter = (run / "adapter_config.json").is_file()
    if adapter and not merge:
        raise DpokitError(f"export: {run} holds a LoRA adapter; pass --merge to fold it into the base model")
    if not adapter and (merge or base):
        raise DpokitError(f"export: {run} holds a full model, no LoRA adapter: {'--merge' if merge else '--base'} "
                          "has nothing to fold in; export it without")
    if adapter:
        base = base or run_base_model(run)
        model = load_lora_run(run, torch.device("cpu"), base=base)
    else:
        model = load_policy(str(run), torch.device("cpu"))
    tokenizer = load_tokenizer(str(run) if (run / "tokenizer_config.json").is_file() else base or str(run))
    if overwrite:
        clear_for_overwrite(output, "export: --output")  # no file of an earlier export may survive
    atomic_save_pretrained(output, model.to(torch_dtype), tokenizer)
    if not is_gguf(run):  # a GGUF file is a model, not a run: there is no training to describe
        write_model_card(output, run_folder=run, name=Path(output).name)
    return output
