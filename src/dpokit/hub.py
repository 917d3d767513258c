"""`--push-to-hub REPO`: upload a finished run folder to the Hugging Face Hub.

Whether the push can happen is checked before training starts (a repository id, a token, the
Hub reachable), so a run never trains for hours and then fails to publish. What is uploaded is
the model, its tokenizer, the model card and the run's records; checkpoints, the reference
cache and trackers' local stores stay on disk.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from dpokit.errors import DpokitError, first_line
from dpokit.io import Log

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
LEFT_ON_DISK = ["checkpoints/*", "reference-cache/*", ".dpokit.lock", "tensorboard/*", "mlruns/*", "wandb/*"]


def _offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return bool(constants.HF_HUB_OFFLINE) or flag in ("1", "true", "yes", "on")


def check_push_possible(repo: str, option: str = "--push-to-hub") -> None:
    """Refuse, before training, a push that cannot happen; say why in one line."""
    if not _REPO_ID.match(repo):
        raise DpokitError(f"{option} {repo}: expected a repository id like your-name/model-name")
    if _offline():
        raise DpokitError(f"{option} {repo}: the Hub is switched off here (HF_HUB_OFFLINE is set); "
                          "unset it to push, or drop --push-to-hub and upload the run folder later")
    from huggingface_hub import HfApi, get_token

    if not get_token():
        raise DpokitError(f"{option} {repo}: no Hugging Face token; run `hf auth login` or set HF_TOKEN")
    try:
        HfApi().whoami()
    except Exception as exc:  # noqa: BLE001 - any failure here means the push would fail later
        raise DpokitError(f"{option} {repo}: the Hub did not answer ({type(exc).__name__}: "
                          f"{first_line(exc)})") from None


def push_run(folder: str | Path, repo: str, *, private: bool, log: Log = print) -> str:
    """Create `repo` (if new) and upload `folder` to it; returns the repository's address."""
    from huggingface_hub import HfApi

    api = HfApi()
    url = api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
    api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model", ignore_patterns=LEFT_ON_DISK,
                      commit_message="dpokit: upload trained run")
    log(f"pushed {folder} to {url}")
    return str(url)
