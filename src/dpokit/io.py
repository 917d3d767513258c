"""Atomic file output: write to a temporary name beside the target, then rename into place.

A crash mid-write leaves the previous file (or none), never a half-written one. Also here, at
the bottom where every layer can use them: the names of the files a run folder holds, the
reader of a run's resolved config, and `Log`, the callback progress lines go to.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from dpokit.config.load import RUN_CONFIG_FILE as RUN_CONFIG_FILE  # the run folder's files are named here
from dpokit.errors import DpokitError, first_line

# Where a function writes its progress lines: `print`, or a caller's collector.
Log = Callable[[str], None]


def counted(number: int, noun: str) -> str:
    """'1 pair', '2 pairs': a count in a progress line."""
    return f"{number} {noun}" + ("" if number == 1 else "s")

# The advisory lock file a run holds in its folder (left in place: removing it would let two
# processes lock two different files of the same name).
LOCK_FILE = ".dpokit.lock"
# Every line a training run logs, in its folder: what a console that went away (`| head`) missed.
RUN_LOG_FILE = "train.log"


class SaidOnce:
    """A Log that passes each distinct line on once: the notes on settings that a command's runs
    share (a sweep's runs, online's rounds: "beyond the model's context", a warm-up warning) are
    said once per command, not once per run."""

    def __init__(self, log: Log) -> None:
        self.log, self.said = log, set()

    def __call__(self, line: str) -> None:
        if line not in self.said:
            self.said.add(line)
            self.log(line)


def read_run_config(run_dir: str | Path) -> dict | None:
    """The resolved config a dpokit run wrote into `run_dir`, or None for any other folder."""
    path = Path(run_dir) / RUN_CONFIG_FILE
    if not path.is_file():
        return None
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise DpokitError(f"{path}: not a readable run config ({first_line(exc)})") from None
    return loaded if isinstance(loaded, dict) else None



def file_sha256(path: str | Path) -> bytes:
    """SHA-256 of a file's bytes, read 16 MiB at a time (model weights do not fit in memory twice)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 24):
            digest.update(block)
    return digest.digest()

def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600; published files get the usual mode
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save_pretrained(folder: str | Path, *savables: Any) -> None:
    """`save_pretrained` each object (model, tokenizer) into a temporary folder beside `folder`,
    then move each file into `folder` with an atomic rename."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    staging = make_staging_dir(folder, ".saving-")
    try:
        for obj in savables:
            obj.save_pretrained(staging)
        fsync_tree(staging)
        for item in sorted(staging.iterdir()):
            os.replace(item, folder / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_staging_dir(parent: Path, prefix: str) -> Path:
    """A temporary folder beside its final place, with the mode a plain mkdir would give
    (mkdtemp makes 0700, which a rename would publish)."""
    staging = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    staging.chmod(0o777 & ~current_umask())
    return staging


def fsync_tree(folder: Path) -> None:
    """Flush every file in `folder` to disk, so a rename after it publishes complete files; each gets
    the mode a plain open() would give (safetensors writes its files 0600 through a temporary file)."""
    mode = 0o666 & ~current_umask()
    for item in Path(folder).iterdir():
        if item.is_file():
            item.chmod(mode)
            with open(item, "rb") as handle:
                os.fsync(handle.fileno())


class JsonlWriter:
    """Appends one JSON object per line, flushed at once so a crash loses at most that line."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = self.path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._handle.write(json.dumps(record) + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


def folder_entries(folder: Path) -> list[Path]:
    """What a folder holds, the run lock file aside (a folder holding only that counts as empty)."""
    return [p for p in Path(folder).iterdir() if p.name != LOCK_FILE]


class FolderLock:
    """The run lock of a folder, held: FOLDER/.dpokit.lock, and any other lock file `hold` takes
    (a folder swapped into FOLDER's place brings its own lock file: `dpokit.folder_swap`). Every
    one is released when the `run_folder_lock` block ends."""

    def __init__(self, folder: Path, flag: str) -> None:
        self.folder, self.flag = folder, flag
        self._handles: list = []

    def hold(self, lock_file: Path) -> None:
        """Take the exclusive lock on `lock_file` (created if missing) until the block ends; refused
        at once, naming the holder's pid, when another process has it."""
        handle = open(lock_file, "a+", encoding="utf-8")  # noqa: SIM115 - held open for the block
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise DpokitError(f"{self.flag} {self.folder}: cannot lock the folder ({exc.strerror})") from None
            raise DpokitError(f"{self.flag} {self.folder} is in use by another dpokit process (pid {holder}); wait "
                              "for it to finish or stop it, or choose another folder") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._handles.append(handle)

    def release(self) -> None:
        for handle in self._handles:
            handle.close()
        self._handles.clear()


@contextmanager
def run_folder_lock(folder: str | Path, flag: str = "--output") -> Iterator[FolderLock]:
    """Hold an exclusive advisory lock on `folder` (created if missing) while the block runs.

    fcntl.flock on FOLDER/.dpokit.lock: the kernel releases it when the process exits, however it
    exits (SIGKILL included), so no stale lock is ever left behind. A second process asking for it
    is refused at once with one line naming the holder's pid (written into the file).
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise DpokitError(f"{flag} {folder} is a file, not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    lock = FolderLock(folder, flag)
    try:
        lock.hold(folder / LOCK_FILE)
        yield lock
    finally:
        lock.release()


def shows_progress(choice: str) -> bool:
    """--progress on/off/auto: progress bars, with auto meaning when stderr is a terminal."""
    return choice == "on" or (choice == "auto" and sys.stderr.isatty())


def silence_stdout() -> None:
    """Point stdout at /dev/null once its reader went away (`dpokit ... | head`), so later prints and
    the interpreter's final flush do not fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def console(line: str) -> None:
    """`print` for progress lines that outlive their reader: a closed stdout ends nothing."""
    try:
        print(line, flush=True)
    except BrokenPipeError:
        silence_stdout()
