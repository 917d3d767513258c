"""Atomic checkpoints and exact resume.

A checkpoint is a folder `checkpoints/step-NNNNNNN/` holding everything the loop needs to continue
as if it had never stopped: policy weights (safetensors), the reference's when TR-DPO updates
them (`reference.safetensors`), optimizer and scheduler state, RNG states, the position in the data order, the metrics so far, the resolved config and the
fingerprints of the data and the reference. It is written under a temporary name and renamed
into place, so a crash mid-save never damages the last good checkpoint; `trainer_state.json`
is written last, so a folder without it is never trusted.
"""

from __future__ import annotations

import errno
import json
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from dpokit.config import INPUT, RunConfig, coerce, dump_yaml, iter_options
from dpokit.errors import DpokitError, first_line
from dpokit.io import RUN_CONFIG_FILE, fsync_tree, make_staging_dir
from dpokit.train.distributed import Distributed
from dpokit.train.state import load_optimizer_state, load_trainable_state, optimizer_state, trainable_state

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
REFERENCE_FILE = "reference.safetensors"  # a live reference that --sync-reference-steps updates
_NAME = re.compile(r"^step-(\d+)$")

# Options that do not change what a run computes: they may differ between a run and its resume.
RESUME_MAY_CHANGE = {
    "output", "overwrite", "progress", "log_every", "eval_every", "eval_data", "save_every",
    "keep_checkpoints", "resume", "device", "reference_cache", "report_to", "push_to_hub", "hub_private",
    # How the work is split and stored, not what is computed (the global batch is checked apart).
    "batch_size", "gradient_accumulation_steps", "parallel", "fsdp_cpu_offload", "gradient_checkpointing",
    "selective_recompute", "malloc_mmap_threshold", "allow_large_learning_rate", "activation_offload",
}


@dataclass
class TrainState:
    """Where the loop is: optimizer steps done, and the data-order position they correspond to."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    nonfinite_skipped: int = 0
    data_fingerprint: str = ""
    reference_fingerprint: str | None = None
    global_batch_size: int = 0  # pairs per optimizer step over all ranks: may be split differently on resume
    history: list[dict] = field(default_factory=list)
    loss_state: dict = field(default_factory=dict)  # the loss's running statistics (β-DPO's M0), if any


def checkpoint_dir(output: Path) -> Path:
    return Path(output) / CHECKPOINTS


def list_checkpoints(output: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    folder = checkpoint_dir(output)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found) if (p / STATE_FILE).is_file()]


def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "cached_gaussian": cached},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    output: Path, state: TrainState, cfg: RunConfig, policy, optimizer, scheduler, keep: int,
    ctx: Distributed | None = None, scaler: torch.amp.GradScaler | None = None,
    reference: torch.nn.Module | None = None,
) -> Path:
    """Write a checkpoint atomically, then delete all but the newest `keep`; with `reference` (a
    live reference whose weights TR-DPO updates, single process) its weights too.

    Called on every rank: under FSDP2 the full weights and optimizer state are gathered to rank
    0 (a collective), and every rank's RNG state is collected; rank 0 alone writes. The other
    ranks wait until the folder is in place, so none exits (or is stopped) mid-save.
    """
    ctx = ctx or Distributed()
    weights = trainable_state(policy, ctx)
    optim = optimizer_state(policy, optimizer, ctx)
    rng = ctx.gather_objects(_rng_state())
    folder = checkpoint_dir(output)
    final = folder / f"step-{state.step:07d}"
    if not ctx.is_main:
        ctx.barrier()
        return final
    try:
        folder.mkdir(parents=True, exist_ok=True)
        staging = make_staging_dir(folder, f".tmp-{final.name}-")
        extra_weights = {REFERENCE_FILE: reference_weights(reference)} if reference is not None else {}
        _write_staging(staging, final, cfg, state, {"model.safetensors": weights, **extra_weights}, optim, scheduler,
                       rng, scaler)
    except OSError as exc:
        previous = list_checkpoints(output)
        kept = f"; the last good checkpoint {previous[-1]} is intact" if previous else ""
        reason = "no space left on device" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        raise DpokitError(f"could not save checkpoint {final}: {reason}{kept}") from None
    for old in list_checkpoints(output)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    ctx.barrier()
    return final


def _write_staging(staging: Path, final: Path, cfg: RunConfig, state: TrainState, weights: dict[str, dict],
                   optim, scheduler, rng: list, scaler) -> None:
    """`weights`: file name -> the tensors it holds (safetensors)."""
    try:
        for name, tensors in weights.items():
            save_file(tensors, str(staging / name))
        extra = {"optimizer": optim, "scheduler": scheduler.state_dict(), "rng": rng}
        if scaler is not None and scaler.is_enabled():
            extra["scaler"] = scaler.state_dict()
        torch.save(extra, staging / "training_state.pt")
        (staging / RUN_CONFIG_FILE).write_text(dump_yaml(cfg), encoding="utf-8")
        (staging / STATE_FILE).write_text(json.dumps(asdict(state)), encoding="utf-8")
        fsync_tree(staging)
        if final.exists():  # a finished run re-saved at the same step: replace it whole
            shutil.rmtree(final)
        staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def reference_weights(reference: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A live reference's parameters by name, a tied one once (buffers are constants)."""
    return {name: p.detach().cpu().contiguous() for name, p in reference.named_parameters()}


def load_reference_weights(reference: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    params = dict(reference.named_parameters())
    if params.keys() != weights.keys() or any(params[n].shape != weights[n].shape for n in params):
        raise ValueError("the reference weights do not match the reference model")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(weights[name])


def remove_stale_staging(output: Path) -> None:
    """Delete temporary folders left by a save that was killed."""
    folder = checkpoint_dir(output)
    if folder.is_dir():
        for tmp in folder.glob(".tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)


def load_checkpoint(path: Path, policy, optimizer, scheduler, ctx: Distributed | None = None,
                    scaler: torch.amp.GradScaler | None = None, reference: torch.nn.Module | None = None
                    ) -> TrainState:
    """Restore weights (the reference's too, when given), optimizer, scheduler, loss scale and RNG
    from `path`; return the loop position.

    Every rank reads the folder (multi-node runs need it on a shared file system). Each rank gets
    its own RNG state back when the world size is unchanged, rank 0's otherwise.
    """
    ctx = ctx or Distributed()
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        raise DpokitError(f"--resume {path}: not a complete dpokit checkpoint (no {STATE_FILE})")
    weights = _read_file(path, "model.safetensors", lambda f: load_file(str(f)))
    extra = _read_file(path, "training_state.pt", lambda f: torch.load(f, weights_only=True))
    saved_reference = _read_file(path, REFERENCE_FILE, lambda f: load_file(str(f))) if reference is not None else None
    try:
        load_trainable_state(policy, weights, ctx)
        if saved_reference is not None:
            load_reference_weights(reference, saved_reference)
        state = TrainState(**json.loads((path / STATE_FILE).read_text(encoding="utf-8")))
    except (OSError, RuntimeError, ValueError, TypeError) as exc:
        raise DpokitError(f"--resume {path}: checkpoint is damaged or from another model ({exc})") from None
    load_optimizer_state(policy, optimizer, extra["optimizer"], ctx)
    scheduler.load_state_dict(extra["scheduler"])
    if scaler is not None and "scaler" in extra:
        scaler.load_state_dict(extra["scaler"])
    rng = extra["rng"]
    _set_rng_state(rng[ctx.rank] if len(rng) == ctx.world_size else rng[0])
    return state


def _read_file(checkpoint: Path, name: str, read):
    """Read one file of a checkpoint; a truncated or garbled one is named, with the checkpoint to
    fall back to (the newest complete one before it)."""
    try:
        return read(checkpoint / name)
    except Exception as exc:  # noqa: BLE001 - safetensors, zip, pickle and OS errors all mean "damaged"
        reason = first_line(exc)[:120]
        older = [c for c in list_checkpoints(checkpoint.parent.parent) if c.name < checkpoint.name]
        fallback = (f"; the last good checkpoint before it is {older[-1]} (pass --resume {older[-1]})" if older
                    else "; no earlier checkpoint exists, so start over with --overwrite")
        raise DpokitError(f"--resume: {checkpoint / name} is damaged ({reason}){fallback}") from None


def saved_config(path: Path) -> dict[str, dict[str, Any]]:
    return yaml.safe_load((Path(path) / RUN_CONFIG_FILE).read_text(encoding="utf-8"))


def check_resumable(saved: dict[str, dict[str, Any]], cfg: RunConfig, where: Path) -> None:
    """Refuse to resume when an option that changes the computation differs."""
    for section, f in iter_options():
        if f.name in RESUME_MAY_CHANGE:
            continue
        # Converted as on load: an older checkpoint wrote lists as comma strings.
        before = coerce(saved.get(section, {}).get(f.name, f.default), f, f"{where}: {section}.{f.name}")
        now = getattr(getattr(cfg, section), f.name)
        if _compared(before, f) != _compared(now, f):
            flag = "--" + f.name.replace("_", "-")
            raise DpokitError(
                f"cannot resume from {where}: {flag} differs (checkpoint: {before!r}, now: {now!r}); "
                "use the original value or start a new run in another --output"
            )


def _compared(value: Any, f) -> Any:
    """A local input path as the file it names (`./data/a.jsonl` is `data/a.jsonl`); its content is
    checked apart (`check_resume_data`: the data's token ids; the reference's weights)."""
    if f.metadata.get("path") != INPUT or not isinstance(value, str):
        return value
    path = Path(value).expanduser()
    return path.resolve() if path.exists() else value


def _saved_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(path) / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DpokitError(f"--resume {path}: checkpoint is damaged ({exc})") from None


_START_OVER = "or start over with --overwrite (or in another --output)"


def check_resume_data(path: Path, data_fingerprint: str, global_batch: int) -> None:
    """Refuse a resume whose training data or global batch differ from the checkpoint's; reads
    only trainer_state.json, so it runs before the model is loaded or the reference computed."""
    saved = _saved_state(path)
    if saved.get("data_fingerprint") != data_fingerprint:
        raise DpokitError(f"cannot resume from {path}: the training data (or its tokenization: --max-length, "
                          f"the tokenizer, ...) differs from the checkpoint's; use the original data, {_START_OVER}")
    if saved.get("global_batch_size", 0) not in (0, global_batch):
        raise DpokitError(
            f"cannot resume from {path}: the global batch (batch size x accumulation x processes) "
            f"was {saved['global_batch_size']}, now {global_batch}; split the same global batch differently"
        )


def check_resume_reference(path: Path, reference_weights: str | None, source: str | None) -> None:
    """Refuse a resume whose reference weights (the model folder's files) changed since the checkpoint."""
    before = _saved_state(path).get("reference_fingerprint")
    if before is not None and reference_weights is not None and before != reference_weights:
        raise DpokitError(f"cannot resume from {path}: the reference model's weights ({source}) changed since the "
                          f"checkpoint; restore the original weights, {_START_OVER}")


def resolve_resume(cfg: RunConfig) -> Path | None:
    """The checkpoint to resume from, or None to start fresh."""
    option = cfg.train.resume
    output = Path(cfg.train.output)
    if option in (None, "none", "no"):
        return None
    if option == "auto":
        found = list_checkpoints(output)
        return found[-1] if found else None
    path = Path(option)
    if not path.is_dir():
        raise DpokitError(f"--resume {option}: no such checkpoint folder")
    if not (path / STATE_FILE).is_file() or not (path / RUN_CONFIG_FILE).is_file():
        raise DpokitError(f"--resume {option}: not a complete dpokit checkpoint (no {STATE_FILE})")
    return path


def find_resume(cfg: RunConfig) -> Path | None:
    """The checkpoint to resume from (None: start fresh), refused at once when an option that
    changes the computation differs from the checkpoint's."""
    resume_from = resolve_resume(cfg)
    if resume_from is not None:
        check_resumable(saved_config(resume_from), cfg, resume_from)
    return resume_from


def start_state(resume_from: Path | None, fresh: TrainState, policy, optimizer, scheduler, ctx: Distributed,
                scaler: torch.amp.GradScaler, reference: torch.nn.Module | None = None) -> TrainState:
    """`fresh` for a new run; on resume, the checkpoint's loop position, with its weights (and
    `reference`'s, under TR-DPO), optimizer, scheduler, loss scale and RNG restored (and the
    global batch of now, same as then)."""
    if resume_from is None:
        return fresh
    state = load_checkpoint(resume_from, policy, optimizer, scheduler, ctx, scaler, reference)
    state.global_batch_size = fresh.global_batch_size
    return state
