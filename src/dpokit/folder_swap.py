"""Replacing what a folder holds so that a crash at any point leaves the old contents or the new.

`--overwrite` (and the demo reusing an earlier demo's folder) never empties a folder in place. The
new contents are built in a sibling, `.NAME.dpokit-swap`, and the two folders trade places in one
atomic step (renameat2's RENAME_EXCHANGE; on a file system without it, three renames whose middle
states `settle` recognises). The new folder carries the marker `.dpokit-replacing` until it holds
something worth keeping (a training run: its first checkpoint; a sweep, online run or demo: its
first run's): until then the old contents wait in the sibling, and a failure swaps them back.
Removing the marker commits the replacement; the sibling is then deleted.

After a SIGKILL, the next dpokit command that locks the folder (`locked_folder`) finishes the job:
a marker means the replacement never committed, so the old contents are swapped back; a sibling
without a marker beside it is garbage, deleted. So the folder always holds one whole run: the old
one, or the new one from the moment it is swapped in.

The run lock lives inside the folder (`io.run_folder_lock`), so it moves with every swap: the
sibling's lock file is taken before a swap, and both are held until the command ends.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

from dpokit.errors import DpokitError, TrainingInterrupted
from dpokit.faults import active, inject
from dpokit.io import LOCK_FILE, FolderLock, Log, folder_entries, run_folder_lock

SWAP_SUFFIX = ".dpokit-swap"  # the sibling: the new contents being built, or the old ones waiting
HALF_SUFFIX = ".dpokit-half"  # where a folder waits between the renames of an exchange without RENAME_EXCHANGE
MARKER = ".dpokit-replacing"  # in the new folder until the replacement commits
_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def swap_path(folder: Path) -> Path:
    return folder.parent / f".{folder.name}{SWAP_SUFFIX}"


def _half_path(folder: Path) -> Path:
    return folder.parent / f".{folder.name}{HALF_SUFFIX}"


def held_entries(folder: Path) -> list[Path]:
    """What a folder holds, its lock file and the replacement marker aside."""
    return [p for p in folder_entries(folder) if p.name != MARKER]


@functools.lru_cache(maxsize=1)
def _renameat2():
    """glibc's renameat2, or None (another C library, another system)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return function


def _rename_exchange(a: Path, b: Path) -> bool:
    """Swap `a` and `b` in one atomic step; False where the system or the file system cannot."""
    function = None if active("no-rename-exchange") else _renameat2()
    if function is None:
        return False
    if function(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False  # NFS, some FUSE and network file systems
    raise OSError(code, os.strerror(code), str(a))


def exchange(folder: Path, sibling: Path) -> None:
    """`folder` and `sibling` (two folders in one parent) trade places. Without RENAME_EXCHANGE,
    `folder` waits at its half path between two renames; `settle` completes or undoes that."""
    if not _rename_exchange(folder, sibling):
        half = _half_path(folder)
        os.rename(folder, half)
        inject("exchange:half")
        try:
            os.rename(sibling, folder)
        except OSError:
            os.rename(half, folder)  # as it was
            raise
        os.rename(half, sibling)
    _fsync_folder(folder.parent)


def _fsync_folder(folder: Path) -> None:
    """Make renames in `folder` survive a power cut, not only a crash."""
    with contextlib.suppress(OSError):
        handle = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)


def discard(path: Path, log: Log) -> None:
    """Delete a sibling that holds nothing to keep; what cannot be deleted is said and left."""
    try:
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)
    except OSError as exc:
        log(f"warning: could not delete {path} ({exc.strerror}); delete it yourself")


def standing(folder: Path) -> Path:
    """Where the contents `folder` stands for are now, for a reader that takes no lock (`dpokit
    runs`): the folder's own; or, while a replacement has not committed (or was killed before),
    the old contents beside it; or where an exchange cut between its renames left them."""
    sibling, half = swap_path(folder), _half_path(folder)
    current = folder
    if half.is_dir() and sibling.is_dir() and not (folder.is_dir() and held_entries(folder)):
        current = half  # the exchange's first rename alone happened
    if (current / MARKER).exists():
        return sibling if sibling.is_dir() else half if half.is_dir() else current
    return current


@contextlib.contextmanager
def locked_folder(folder: str | Path, flag: str = "--output", log: Log = print) -> Iterator[FolderLock]:
    """`io.run_folder_lock`, then `settle`: the block sees the folder whole."""
    with run_folder_lock(folder, flag) as lock:
        settle(lock, log)
        yield lock


def settle(lock: FolderLock, log: Log) -> None:
    """Finish what a killed replacement of the locked folder left: an exchange cut between two
    renames, a replacement that never committed (the old contents come back), a sibling left over."""
    folder = lock.folder
    sibling, half = swap_path(folder), _half_path(folder)
    if half.exists():
        _finish_exchange(lock, sibling, half)
    if (folder / MARKER).exists():
        if not sibling.is_dir():
            raise DpokitError(f"{lock.flag} {folder}: a replacement of its contents never committed, and its previous "
                              f"contents are not in {sibling}; look at the folder, then delete {folder / MARKER}")
        lock.hold(sibling / LOCK_FILE)
        exchange(folder, sibling)
        log(f"{folder}: restored the run it held before an --overwrite that stopped before the new run's first "
            f"checkpoint")
    if sibling.exists() or sibling.is_symlink():
        discard(sibling, log)


def _finish_exchange(lock: FolderLock, sibling: Path, half: Path) -> None:
    """An exchange without RENAME_EXCHANGE was killed. With the sibling still there, the first
    rename alone happened: undo it (the folder may have been recreated, holding only the lock file
    this process took). Otherwise only the last rename is missing: do it."""
    folder = lock.folder
    swapped_in = held_entries(folder) or (folder / MARKER).exists()  # a recreated folder holds only its lock
    if not sibling.exists() and swapped_in:
        os.rename(half, sibling)
        return
    if not sibling.exists() or swapped_in:
        raise DpokitError(f"{lock.flag} {folder}: an interrupted replacement left {half}, and what else is there "
                          f"does not tell how far it went; look at both, keep one as {folder}, delete {half}")
    shutil.rmtree(folder)
    os.rename(half, folder)
    lock.hold(folder / LOCK_FILE)


class Replacement:
    """A locked folder's new contents: built beside it (`where`) when the folder holds something,
    swapped in whole (`swap_in`), then kept (`commit`) or undone (`roll_back`). A folder that holds
    nothing is written in place, and every step is a no-op. `within`: the replacement of a folder
    above, committed with this one (a sweep's root commits when its first run does).

    As a context manager: a normal exit or a TrainingInterrupted (whoever raised it saved what the
    user needs to continue) commits; any other exception rolls back."""

    def __init__(self, folder: str | Path, lock: FolderLock | None, *, replace: bool = True,
                 within: Replacement | None = None, log: Log = print) -> None:
        self.folder, self.within, self.log = Path(folder), within, log
        self.sibling = swap_path(self.folder)
        self.staged = lock is not None and replace and bool(held_entries(self.folder))
        self.swapped = self.committed = False
        if self.staged:
            self._stage(lock)

    def _stage(self, lock: FolderLock) -> None:
        parent = self.folder.parent
        if not os.access(parent, os.W_OK | os.X_OK):
            raise DpokitError(f"{lock.flag} {self.folder}: replacing what it holds needs a folder beside it, and "
                              f"{parent} is not writable; delete its contents yourself, or choose another folder")
        self.sibling.mkdir()
        lock.hold(self.sibling / LOCK_FILE)
        (self.sibling / MARKER).write_text(f"the run {self.folder.name} held before is in {self.sibling.name} "
                                           "until this one commits\n", encoding="utf-8")

    @property
    def where(self) -> Path:
        """Where the new contents are now: the sibling until the swap, then the folder."""
        return self.sibling if self.staged and not self.swapped else self.folder

    def place(self, path: str | Path | None) -> str | None:
        """`path` as it is written now: under `where` when it lies inside the folder."""
        if path is None or self.where == self.folder:
            return None if path is None else str(path)
        try:
            inside = Path(path).resolve().relative_to(self.folder.resolve())
        except ValueError:
            return str(path)
        return str(self.where / inside)

    def relabel(self, log: Log) -> Log:
        """`log`, with the sibling's path shown as the folder's (where those files will be)."""
        if self.where == self.folder:
            return log
        return lambda line: log(line.replace(str(self.sibling), str(self.folder)))

    def swap_in(self) -> None:
        if self.staged and not self.swapped:
            inject("swap:before")
            exchange(self.folder, self.sibling)
            self.swapped = True
            inject("swap:after")

    def commit(self) -> None:
        """The new contents stay: the marker goes (the atomic step), then the old contents."""
        if not self.committed:
            self.swap_in()
            if self.staged:
                (self.folder / MARKER).unlink()
                _fsync_folder(self.folder)
                inject("commit:marker-removed")
                discard(self.sibling, self.log)
            self.committed = True
        if self.within is not None:
            self.within.commit()

    def roll_back(self) -> None:
        """The old contents come back whole (nothing is ever swapped back after a commit)."""
        if not self.staged or self.committed:
            return
        try:
            if self.swapped:
                exchange(self.folder, self.sibling)
                self.swapped = False
            discard(self.sibling, self.log)
        except OSError as exc:
            self.log(f"warning: could not put back what {self.folder} held ({exc.strerror}); the next dpokit "
                     f"command on {self.folder} does")

    @classmethod
    def at_once(cls, folder: str | Path, lock: FolderLock, log: Log = print) -> Replacement:
        """A replacement swapped in now (an experiment's root: its runs write in place from the
        start); a failing swap leaves the folder as it was."""
        replacement = cls(folder, lock, log=log)
        try:
            replacement.swap_in()
        except BaseException:
            replacement.roll_back()
            raise
        return replacement

    def __enter__(self) -> Replacement:
        return self

    def __exit__(self, kind, exc, traceback) -> None:
        if exc is None or isinstance(exc, TrainingInterrupted):
            self.commit()
        else:
            self.roll_back()
