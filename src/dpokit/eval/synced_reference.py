"""A TR-DPO run's final reference, so its preference figures can be measured against it again.

Training's `eval_*` figures keep TRL's names and meaning: they are against the reference the loss
uses at that moment, which under TR-DPO (`--sync-reference-steps`) is the synced one (after a hard
update at the last step, the policy itself: margins 0, accuracy 0). `dpokit evaluate` measures
against the starting model, as its KL and judged figures do, and names it; for a TR-DPO run it
also reports the figures against the run's last synced reference, read from its newest checkpoint,
as `preferences_synced_reference`: the same figures as training's final evaluation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file

from dpokit.errors import DpokitError
from dpokit.io import read_run_config
from dpokit.train.checkpoint import REFERENCE_FILE, STATE_FILE, list_checkpoints, load_reference_weights


@dataclass(frozen=True)
class SyncedReference:
    file: Path  # the newest checkpoint's reference.safetensors
    step: int  # the training step that checkpoint was saved at
    synced_at: int  # the step of the last update it holds

    def describe(self) -> str:
        where = self.file.relative_to(self.file.parents[2])  # checkpoints/step-N/reference.safetensors
        return f"TR-DPO's synced reference after step {self.synced_at} ({where} in the run folder)"

    def load_into(self, reference) -> None:
        """Overwrite `reference` (the run's starting reference, loaded) with these weights."""
        try:
            load_reference_weights(reference, load_file(str(self.file)))
        except (OSError, ValueError, RuntimeError) as exc:
            raise DpokitError(f"{self.file}: cannot load the synced reference ({exc})") from None


def sync_every(run_dir: str | Path) -> int:
    """A run folder's --sync-reference-steps: 0 when its reference stayed fixed (or it is no dpokit run)."""
    return ((read_run_config(run_dir) or {}).get("loss") or {}).get("sync_reference_steps") or 0


def synced_reference(run_dir: str | Path) -> SyncedReference | None:
    """The last synced reference of a TR-DPO run folder (None for any other folder, or a TR-DPO
    run whose checkpoints are gone)."""
    every = sync_every(run_dir)
    checkpoints = list_checkpoints(Path(run_dir)) if every else []
    if not checkpoints or not (checkpoints[-1] / REFERENCE_FILE).is_file():
        return None
    try:
        step = int(json.loads((checkpoints[-1] / STATE_FILE).read_text(encoding="utf-8"))["step"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DpokitError(f"{checkpoints[-1] / STATE_FILE}: cannot read the checkpoint's step ({exc})") from None
    return SyncedReference(checkpoints[-1] / REFERENCE_FILE, step, step // every * every)
