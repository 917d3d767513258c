"""The run folder around the checkpoints: checked before a run, its metrics.jsonl and
resolved config at the start (or rewound on resume), the final model at the end. Rank 0 alone
calls what writes here, but `save_final_model`, which every rank joins."""

from __future__ import annotations

import json
from pathlib import Path

from dpokit.config import RunConfig, TrainConfig, dump_yaml
from dpokit.io import RUN_CONFIG_FILE, atomic_save_pretrained, atomic_write_text
from dpokit.paths import check_replaceable
from dpokit.train import checkpoint as ckpt
from dpokit.train.distributed import Distributed
from dpokit.train.state import pretrained_state
from dpokit.train.wrap import unwrap


def check_output(train: TrainConfig, resuming: bool) -> None:
    """Before any work, and without touching the folder: refuse to mix a new run into a folder that
    holds something else (paths.check_replaceable, with train's own advice); a resumed run's folder
    is its own, and loses only what a killed checkpoint save left."""
    output = Path(train.output)
    if resuming:
        ckpt.remove_stale_staging(output)
        return
    refusal = ("--resume auto: {folder} holds no complete checkpoint to resume from; pass {overwrite}, or choose a "
               "new folder" if train.resume == "auto" else
               "{option} {folder} holds another dpokit run; pass --resume auto to continue it, {overwrite}, or "
               "choose a new folder")
    check_replaceable(output, overwrite=train.overwrite, refusal=refusal)


def start_run_files(output: Path, cfg: RunConfig, resumed_step: int | None) -> None:
    """metrics.jsonl: rewound to the resumed step, or removed for a new run; the resolved config."""
    if resumed_step is not None:
        rewind_metrics(output / "metrics.jsonl", resumed_step)
    else:
        (output / "metrics.jsonl").unlink(missing_ok=True)
    atomic_write_text(output / RUN_CONFIG_FILE, dump_yaml(cfg))


def rewind_metrics(path: Path, step: int) -> None:
    """Keep the metrics.jsonl lines up to the resumed step, so the file reads as one run."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if int(json.loads(line)["step"]) <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError):  # a line cut short by the crash
            continue
    atomic_write_text(path, "".join(kept))


def save_final_model(output: Path, policy, tokenizer, ctx: Distributed) -> None:
    """The trained policy (or LoRA adapter) and its tokenizer in Hugging Face format; every rank
    calls it (gathering the weights is a collective under FSDP2), rank 0 writes."""
    full_weights = pretrained_state(policy, ctx)
    if ctx.is_main:
        atomic_save_pretrained(output, _Savable(unwrap(policy), full_weights), tokenizer)
    ctx.barrier()


class _Savable:
    """`save_pretrained` with the gathered weights under FSDP2 (None: the module's own)."""

    def __init__(self, model, state_dict):
        self.model, self.state_dict = model, state_dict

    def save_pretrained(self, folder) -> None:
        if self.state_dict is None:
            self.model.save_pretrained(folder)
        else:
            self.model.save_pretrained(folder, state_dict=self.state_dict)
