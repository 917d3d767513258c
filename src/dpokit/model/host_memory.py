"""Giving freed host memory back to the system during training (glibc's malloc).

PyTorch's CPU tensors come from malloc. glibc serves a request from its heap unless it is at
least the mmap threshold, and that threshold adapts: each freed mmap'd block raises it to that
block's size, up to 32 MiB. After a few steps, activations of up to 32 MiB live in the heap, and
a freed heap block stays in the process (counted in its RSS) until what lies above it is freed
too. Long sequences free and allocate many such blocks per step, in changing orders, so the
heap keeps the high-water mark of every step's fragments: at the 4k-token set of
benchmarks/RESULTS.md section 5 this was most of dpokit's peak RSS beyond the tensors alive at
any one time. A fixed threshold (`mallopt(M_MMAP_THRESHOLD)`, which also stops the adapting)
keeps every block at least that large in its own mapping, returned to the system when freed.

It is not free: each such block is mapped, zero-filled page by page and unmapped again. Where
rows are short that is nearly all the work (the demo at 1 MiB: 46.8 s of system time instead of
3.6 s), so `--malloc-mmap-threshold auto` fixes it only for long rows on the CPU, where the
retained heap is what fills memory (benchmarks/RESULTS.md section 5). With gradient
checkpointing, rows shorter than that get a fixed threshold of 8 MiB: a checkpointed step frees
and allocates its recomputed blocks layer by layer, and on SmolLM2-135M those from 8 MiB up kept
a tenth of the peak RSS at 768 tokens (for no time) and a fifth at 2048 (for 5 percent of the
pairs/s; RESULTS.md section 9). Without checkpointing the same threshold cost about a tenth of
the speed for a few percent of memory (the saved activations are each mapped and zero-filled
once a step), so auto leaves it.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable

from dpokit.config.parsers import parse_mmap_threshold

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
AUTO_THRESHOLD = 1 << 20  # what auto fixes (at the 4k set: 1037 MB peak RSS at 1 MiB, 1151 at 4 MiB, 1921 adaptive)
AUTO_MIN_ROW_TOKENS = 3072  # auto fixes it from this longest sequence on (RESULTS.md section 5: at 2k it cost +30-54% wall for -42% RSS)
# What auto fixes for shorter rows under gradient checkpointing (RESULTS.md section 9: SmolLM2-135M,
# 768 tokens: peak RSS -10% at the same pairs/s; 2048: -22%, 5% fewer pairs/s; 4 MiB: more for -6 to -10%).
AUTO_CHECKPOINTING_THRESHOLD = 8 << 20


def threshold_for(setting: int | None, longest_row: int, device_type: str, checkpointing: bool = False) -> int:
    """The threshold to fix (0: none). `setting` is `--malloc-mmap-threshold` parsed (None: auto);
    `longest_row` the data's longest sequence in tokens (prompt + the longer response);
    `checkpointing`: the run uses gradient checkpointing."""
    if setting is not None:
        return setting
    if device_type != "cpu":
        return 0
    if longest_row >= AUTO_MIN_ROW_TOKENS:
        return AUTO_THRESHOLD
    return AUTO_CHECKPOINTING_THRESHOLD if checkpointing else 0


def fix_mmap_threshold(threshold: int) -> bool:
    """Fix glibc's mmap threshold at `threshold` bytes for the rest of the process.

    Returns whether it was set: False for 0 (leave malloc as it is), outside Linux, and where
    the C library is not glibc (musl has no such setting). Numerics are unaffected: only where
    freed memory goes changes.
    """
    if threshold <= 0 or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, threshold) == 1


def apply_mmap_setting(setting_text: str, longest_row: int, device_type: str, log: Callable[[str], None],
                       checkpointing: bool = False) -> None:
    """`--malloc-mmap-threshold` for the run, from the start of training (process-wide): fixed when
    given, and under auto when `longest_row` (the data's longest sequence, in tokens) is long or
    the run uses gradient checkpointing (`checkpointing`), with one log line saying why."""
    setting = parse_mmap_threshold(setting_text)  # None: auto
    threshold = threshold_for(setting, longest_row, device_type, checkpointing)
    if fix_mmap_threshold(threshold) and setting is None:
        why = (f"long sequences (up to {longest_row} tokens)" if longest_row >= AUTO_MIN_ROW_TOKENS
               else "gradient checkpointing on the CPU")
        log(f"{why}: freed host memory blocks of {threshold >> 20} MiB or more "
            "go back to the system (--malloc-mmap-threshold auto; 0 keeps malloc's adaptive threshold)")
