"""Atomic checkpoints and exact resume.

A checkpoint is a folder `checkpoints/step-NNNNNNN/` holding everything the loop needs to continue
as if it had never stopped: policy weights (safetensors), optimizer and scheduler state, RNG
states, the position in the data order, the metrics so far, the resolved config and the
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
from safetensors.torch import load_model, save_model

from dpokit.config import RunConfig, dump_yaml, iter_options
from dpokit.errors import DpokitError
from dpokit.io import fsync_tree, make_staging_dir

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^step-(\d+)$")

# Options that do not change what a run computes: they may differ between a run and its resume.
RESUME_MAY_CHANGE = {
    "output", "overwrite", "progress", "log_every", "eval_every", "eval_data", "save_every",
    "keep_checkpoints", "resume", "device",
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
    history: list[dict] = field(default_factory=list)


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
    output: Path, state: TrainState, cfg: RunConfig, policy, optimizer, scheduler, keep: int
) -> Path:
    """Write a checkpoint atomically, then delete all but the newest `keep`."""
    folder = checkpoint_dir(output)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{state.step:07d}"
    staging = make_staging_dir(folder, f".tmp-{final.name}-")
    try:
        save_model(policy, str(staging / "model.safetensors"))
        torch.save(
            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state()},
            staging / "training_state.pt",
        )
        (staging / "dpokit_config.yaml").write_text(dump_yaml(cfg), encoding="utf-8")
        (staging / STATE_FILE).write_text(json.dumps(asdict(state)), encoding="utf-8")
        fsync_tree(staging)
        if final.exists():  # a finished run re-saved at the same step: replace it whole
            shutil.rmtree(final)
        staging.rename(final)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        previous = list_checkpoints(output)
        kept = f"; the last good checkpoint {previous[-1]} is intact" if previous else ""
        reason = "no space left on device" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        raise DpokitError(f"could not save checkpoint {final}: {reason}{kept}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for old in list_checkpoints(output)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def remove_stale_staging(output: Path) -> None:
    """Delete temporary folders left by a save that was killed."""
    folder = checkpoint_dir(output)
    if folder.is_dir():
        for tmp in folder.glob(".tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)


def load_checkpoint(path: Path, policy, optimizer, scheduler) -> TrainState:
    """Restore weights, optimizer, scheduler and RNG from `path`; return the loop position."""
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        raise DpokitError(f"--resume {path}: not a complete dpokit checkpoint (no {STATE_FILE})")
    try:
        load_model(policy, str(path / "model.safetensors"))
        extra = torch.load(path / "training_state.pt", weights_only=True)
        state = TrainState(**json.loads((path / STATE_FILE).read_text(encoding="utf-8")))
    except (OSError, RuntimeError, ValueError, TypeError) as exc:
        raise DpokitError(f"--resume {path}: checkpoint is damaged or from another model ({exc})") from None
    optimizer.load_state_dict(extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    _set_rng_state(extra["rng"])
    return state


def saved_config(path: Path) -> dict[str, dict[str, Any]]:
    return yaml.safe_load((Path(path) / "dpokit_config.yaml").read_text(encoding="utf-8"))


def check_resumable(saved: dict[str, dict[str, Any]], cfg: RunConfig, where: Path) -> None:
    """Refuse to resume when an option that changes the computation differs."""
    current = cfg.to_dict()
    for section, f in iter_options():
        if f.name in RESUME_MAY_CHANGE:
            continue
        before = saved.get(section, {}).get(f.name, f.default)
        now = current[section][f.name]
        if before != now:
            flag = "--" + f.name.replace("_", "-")
            raise DpokitError(
                f"cannot resume from {where}: {flag} differs (checkpoint: {before!r}, now: {now!r}); "
                "use the original value or start a new run in another --output"
            )


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
    if not (path / STATE_FILE).is_file() or not (path / "dpokit_config.yaml").is_file():
        raise DpokitError(f"--resume {option}: not a complete dpokit checkpoint (no {STATE_FILE})")
    return path
