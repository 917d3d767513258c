"""What an online run has done so far, so that `--resume auto` continues it where it stopped.

OUTPUT/online_progress.json is rewritten (atomically) at three moments: when the run starts (its
settings), when a round's pairs are written (the round is *sampled*: its pairs file, the file's
SHA-256 and the pair statistics), and when a round's model is saved and its evaluation row
computed (the round is *finished*: its frontier point). A resumed run keeps the finished rounds
as they are, reuses the sampled round's pairs when the file still has the recorded SHA-256, and
resumes that round's training from its own newest checkpoint (train's `--resume auto`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from dpokit.config import JudgeConfig, OnlineConfig, RunConfig, SamplingConfig, flag_of, iter_options
from dpokit.errors import DpokitError
from dpokit.io import atomic_write_text, file_sha256
from dpokit.train.checkpoint import RESUME_MAY_CHANGE

PROGRESS_FILE = "online_progress.json"

# Options a resumed online run may change: train's (they change no figure) but the batch split,
# which every later round would split differently; --rounds (a run may grow); and the file
# options whose contents are compared instead (prompts) or that online fills in itself (data).
ONLINE_MAY_CHANGE = (RESUME_MAY_CHANGE - {"batch_size", "gradient_accumulation_steps"}) | {
    "data", "eval_data", "rounds", "eval_prompts", "prompts", "max_prompts"}


def online_settings(base: RunConfig, online: OnlineConfig, judging: JudgeConfig, sampling: SamplingConfig,
                    prompts: Sequence, eval_prompts: Sequence) -> dict:
    """Everything that decides an online run's figures: {flag: value}, the prompts by content."""
    values = [(f, getattr(getattr(base, section), f.name)) for section, f in iter_options()]
    for part in (online, judging, sampling):
        values += [(f, getattr(part, f.name)) for f in dataclasses.fields(part)]
    settings = {flag_of(f): list(v) if isinstance(v, tuple) else v for f, v in values if f.name not in ONLINE_MAY_CHANGE}
    settings["--prompts"] = _fingerprint(prompts)
    settings["--eval-prompts"] = _fingerprint(eval_prompts)
    return json.loads(json.dumps(settings))  # as the file holds them: lists for tuples


def _fingerprint(rows: Sequence) -> str:
    return hashlib.sha256(json.dumps(list(rows), sort_keys=True).encode("utf-8")).hexdigest()


class OnlineProgress:
    """OUTPUT/online_progress.json: the run's settings, the reference's frontier row and one
    record per round begun ({"round", "policy_sampled", "pairs_file", "pair_stats", "point"}, the
    point None until the round is finished), as online.json lists them."""

    def __init__(self, root: Path, settings: dict, *, reference_point: dict | None = None,
                 rounds: list[dict] | None = None, pairs_sha256: dict[str, str] | None = None):
        self.path = Path(root) / PROGRESS_FILE
        self.settings, self.reference_point = settings, reference_point
        self.rounds = {r["round"]: r for r in rounds or []}
        self.pairs_sha256 = dict(pairs_sha256 or {})

    @classmethod
    def read(cls, root: Path) -> OnlineProgress | None:
        """The progress of the run in `root`, or None when none was started there."""
        path = Path(root) / PROGRESS_FILE
        if not path.is_file():
            return None
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
            return cls(root, saved["settings"], reference_point=saved.get("reference_point"),
                       rounds=saved.get("rounds"), pairs_sha256=saved.get("pairs_sha256"))
        except (ValueError, KeyError, TypeError) as exc:
            raise DpokitError(f"{path}: not a readable online progress file ({exc}); start over with --overwrite") from None

    def check_settings(self, now: dict) -> None:
        """Refuse to continue with a setting that changes the figures; `now` as `online_settings`."""
        for flag in sorted(set(self.settings) | set(now)):
            before, current = self.settings.get(flag), now.get(flag)
            if before != current:
                shown = "its contents differ" if flag in ("--prompts", "--eval-prompts") else (
                    f"interrupted run: {before!r}, now: {current!r}")
                raise DpokitError(f"cannot resume the online run in {self.path.parent}: {flag} differs ({shown}); "
                                  "use the original value, or start a new run in another --output")

    def check_rounds(self, rounds: int) -> None:
        finished = self.finished_rounds()
        if rounds < len(finished):
            raise DpokitError(f"--rounds {rounds}: the online run in {self.path.parent} has finished "
                              f"{len(finished)} rounds already; give --rounds {len(finished)} or more")

    def finished_rounds(self) -> list[dict]:
        return [r for _, r in sorted(self.rounds.items()) if r.get("point") is not None]

    def finished(self, number: int) -> dict | None:
        record = self.rounds.get(number)
        return record if record and record.get("point") is not None else None

    def sampled_pairs(self, number: int) -> dict | None:
        """Round `number`'s record when its pairs file is there, whole, as written; else None."""
        record = self.rounds.get(number)
        if record is None:
            return None
        path = Path(record["pairs_file"])
        return record if path.is_file() and file_sha256(path).hex() == self.pairs_sha256.get(str(number)) else None

    def record_sampled(self, record: dict) -> None:
        self.rounds[record["round"]] = {**record, "point": None}
        self.pairs_sha256[str(record["round"])] = file_sha256(Path(record["pairs_file"])).hex()
        self.save()

    def record_finished(self, number: int, point: dict, reference_point: dict | None) -> None:
        self.rounds[number]["point"] = point
        self.reference_point = reference_point
        self.save()

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps({
            "settings": self.settings, "reference_point": self.reference_point,
            "rounds": [r for _, r in sorted(self.rounds.items())], "pairs_sha256": self.pairs_sha256}, indent=1))
