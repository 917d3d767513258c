"""Where a command writes, checked against what it reads, before any work.

One rule for every command: an output never is, contains or lies inside one of the command's
own inputs (model, tokenizer, reference model, data, prompts, config, chat template, ...),
whatever `--overwrite` says; paths are compared after resolving symlinks and `..`. Also here:
the check that an output can be created at all, and `--overwrite`'s clearing of the old run.
"""

from __future__ import annotations

import functools
import os
import shutil
import socket
import tempfile
from collections.abc import Iterable
from pathlib import Path

from dpokit.errors import DpokitError
from dpokit.folder_swap import held_entries
from dpokit.io import RUN_CONFIG_FILE, folder_entries

Named = Iterable[tuple[str, "str | Path | None"]]


def resolved(path: str | Path) -> Path:
    """The absolute path with `~`, symlinks and `..` resolved (missing tails are kept as given)."""
    return Path(os.path.abspath(Path(path).expanduser())).resolve()


def local_path(spec: str | Path | None) -> Path | None:
    """The existing local file or folder an input option names, or None (a hub id, a judge name,
    a path that does not exist). `FOLDER:SPLIT` data specs name FOLDER."""
    if spec is None or str(spec) == "":
        return None
    path = Path(str(spec)).expanduser()
    if path.exists():
        return resolved(path)
    folder, sep, _ = str(spec).rpartition(":")
    if sep and folder and Path(folder).expanduser().exists():
        return resolved(folder)
    return None


def _relation(output: Path, source: Path) -> str | None:
    if output == source:
        return "is"
    if output in source.parents:
        return "contains"
    if source in output.parents:
        return "lies inside"
    return None


def check_outputs_apart(outputs: Named, inputs: Named) -> None:
    """Refuse an output that is, contains or lies inside an existing input; outputs and inputs
    are (option, path) pairs, None paths are skipped."""
    sources = [(option, spec, local_path(spec)) for option, spec in inputs]
    for out_option, out_spec in outputs:
        if out_spec is None or str(out_spec) == "":
            continue
        output = resolved(out_spec)
        for in_option, in_spec, source in sources:
            relation = _relation(output, source) if source is not None else None
            if relation:
                raise DpokitError(
                    f"{out_option} {out_spec} {relation} {in_option} {in_spec}: dpokit never writes over "
                    f"its own inputs (not even with --overwrite); choose another {out_option}"
                )


def check_creatable(path: str | Path, option: str, folder: bool = True) -> None:
    """Fail with one line naming `option` when `path` cannot be created: a file stands where a
    folder is needed (at `path` itself for a folder output, or above it), or the nearest existing
    folder above it is not writable."""
    target = Path(path).expanduser()
    if folder and target.is_file():
        raise DpokitError(f"{option} {path} is a file, not a folder")
    if not folder and target.is_dir():
        raise DpokitError(f"{option} {path} is a folder, not a file")
    above = target.parent
    while not above.exists() and above != above.parent:
        above = above.parent
    if above.exists() and not above.is_dir():
        raise DpokitError(f"{option} {path}: cannot be created, because {above} is a file, not a folder")
    if target.exists():
        return
    if not os.access(above, os.W_OK | os.X_OK):
        raise DpokitError(f"{option} {path}: cannot be created (no permission to write in {above})")
    try:  # permissions do not tell all (/proc, a read-only mount, a full disk): try, and leave nothing
        os.rmdir(tempfile.mkdtemp(prefix=".dpokit-probe-", dir=above))
    except OSError as exc:
        raise DpokitError(f"{option} {path}: cannot be created ({above} takes no new files or folders: "
                          f"{exc.strerror or type(exc).__name__})") from None


def claim_output_folder(folder: str | Path, *, overwrite: bool, option: str = "--output",
                        hint: str = "choose a new folder or pass --overwrite") -> Path:
    """The one guard of every command that writes a folder of its own: refuse a file standing
    there and a folder that already holds something (`hint` says what to do instead), unless
    `overwrite`, which empties it first. The caller creates the folder when it starts writing."""
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise DpokitError(f"{option} {folder} is a file, not a folder")
    if path.is_dir() and folder_entries(path) and not overwrite:
        what = "holds another dpokit run" if (path / RUN_CONFIG_FILE).exists() else "is not empty"
        raise DpokitError(f"{option} {folder} {what}; {hint}")
    if overwrite:
        clear_for_overwrite(path, option)  # nothing of the previous run may survive beside the new one
    return path


# Names only dpokit writes into a folder of its own: a run's (config, metrics, layout check, run
# summary, checkpoints, reference cache) and an experiment root's (online, sweep, demo).
_DPOKIT_NAMES = frozenset({RUN_CONFIG_FILE, "metrics.jsonl", "layout_check.json", "run_summary.json", "checkpoints",
                           "reference-cache", "online_progress.json", "sweep.json", "frontier.csv", "demo.log"})


def is_dpokit_folder(folder: Path) -> bool:
    """A folder dpokit wrote: a run's or an experiment root's (it holds one of the names above), or
    one whose subfolders are runs (a sweep killed in its first run)."""
    entries = folder_entries(folder)
    return any(p.name in _DPOKIT_NAMES for p in entries) or any(
        p.is_dir() and not p.is_symlink() and (p / RUN_CONFIG_FILE).is_file() for p in entries)


def _listing(entries: list[Path], shown: int = 4) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in entries)
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def check_replaceable(folder: str | Path, *, overwrite: bool, option: str = "--output",
                      refusal: str = "{option} {folder} holds another dpokit run; pass {overwrite}, or choose a new "
                      "folder"
                      ) -> None:
    """Refuse, before any work, to write a new run where something is already: a folder that holds
    files dpokit did not write is never replaced (not even with --overwrite); a dpokit run's folder
    only with `overwrite`, else `refusal` (with "{overwrite}": the advice, naming what it deletes).
    The replacement itself is `folder_swap.Replacement`'s."""
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise DpokitError(f"{option} {folder} is a file, not a folder")
    held = held_entries(path) if path.is_dir() else []
    if not held:
        return
    if not is_dpokit_folder(path):
        raise DpokitError(f"{option} {folder} holds files dpokit did not write ({_listing(held)}); dpokit never "
                          f"replaces them, not even with --overwrite: move them away, or choose another {option}")
    if not overwrite:
        advice = f"--overwrite to replace it (deleting {_listing(held)})"
        raise DpokitError(refusal.format(option=option, folder=folder, overwrite=advice))
    refuse_where_you_stand(folder, option)


def clear_for_overwrite(folder: str | Path, option: str = "--output") -> None:
    """`--overwrite`: remove everything in `folder`, so nothing of the previous run survives
    beside the new one (a LoRA adapter beside a full model would load as that adapter). The run
    lock file stays: this process may hold it, and a new file would let a second writer in."""
    folder_path = resolved(folder)
    if not folder_path.is_dir() or not folder_entries(folder_path):
        return
    refuse_where_you_stand(folder, option)
    try:
        for item in folder_entries(folder_path):
            if item.is_dir() and not item.is_symlink():
                shutil.rmtree(item)
            else:
                item.unlink()
    except OSError as exc:
        raise DpokitError(f"{option} {folder}: --overwrite could not empty it ({exc.strerror}: {exc.filename})") from None


def refuse_where_you_stand(folder: str | Path, option: str = "--output") -> None:
    """Replacing a folder deletes it: never the current folder or your home, nor one holding them."""
    folder_path = resolved(folder)
    for guarded, what in ((resolved(Path.cwd()), "the current folder"), (resolved(Path.home()), "your home folder")):
        if folder_path == guarded or folder_path in guarded.parents:
            raise DpokitError(f"{option} {folder}: --overwrite would delete {what}; choose a folder of its own")


def run_inputs(cfg) -> list[tuple[str, str | None]]:
    """The files and folders a training run (a `RunConfig`) reads, by option."""
    return [("--model", cfg.model.model), ("--tokenizer", cfg.model.tokenizer),
            ("--reference-model", cfg.model.reference_model), ("--data", cfg.data.data),
            ("--eval-data", cfg.data.eval_data), ("--chat-template", cfg.data.chat_template)]


def check_run_paths(cfg, extra_inputs: Named = ()) -> None:
    """A run's --output and --reference-cache against its inputs (and the caller's `extra_inputs`,
    e.g. --config, --prompts). The reference cache is an input too: the output may hold it (its
    default place is OUTPUT/reference-cache), but may not be it or lie inside it."""
    inputs = [*run_inputs(cfg), *extra_inputs]
    output, cache = cfg.train.output, cfg.speed.reference_cache
    check_outputs_apart([("--output", output), ("--reference-cache", cache)], inputs)
    if output and cache and local_path(cache) is not None:
        relation = _relation(resolved(output), resolved(cache))
        if relation in ("is", "lies inside"):
            raise DpokitError(f"--output {output} {relation} --reference-cache {cache}: dpokit never writes over "
                              "its own inputs (not even with --overwrite); choose another --output")
    check_creatable(output, "--output")
    if cache:
        check_creatable(cache, "--reference-cache")


def hub_unreachable() -> str | None:
    """Why a hub id cannot be fetched now ("offline (HF_HUB_OFFLINE=1)", "offline (no connection
    ...)"), or None. Asked only for a name that is not a local path, so a mistyped path fails at
    once instead of after a minute of network retries."""
    if hub_offline_by_setting():
        return "offline (HF_HUB_OFFLINE=1)"
    host = _hub_host()
    return None if _answers(host) else f"offline (no connection to {host})"


def hub_offline_by_setting() -> bool:
    """HF_HUB_OFFLINE is set: the libraries look in their caches only, and fail fast."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _hub_host() -> str:
    from urllib.parse import urlparse

    from huggingface_hub import constants

    return urlparse(constants.ENDPOINT).hostname or "huggingface.co"


@functools.lru_cache(maxsize=4)
def _answers(host: str) -> bool:
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError:
        return False
    return True


def in_hub_cache(repo_id: str, filename: str) -> bool:
    """True when `filename` of hub model `repo_id` is in the local Hugging Face cache (usable offline)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, filename), str)
    except ValueError:  # not a valid repo id at all
        return False
