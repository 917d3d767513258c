"""--malloc-mmap-threshold: freed blocks at or above the threshold leave the process (glibc)."""

import subprocess
import sys

import pytest

from dpokit.cli import main
from dpokit.model.host_memory import fix_mmap_threshold
from helpers.toy import make_pairs, save_tiny_model, write_jsonl

# In a fresh process: a 20 MiB block freed (glibc's adaptive threshold rises to 20 MiB), then a
# touched 10 MiB block with a small block after it, freed: under the adaptive threshold it sat
# in the heap below the small block and stays resident; with the threshold fixed it was its own
# mapping and goes back. Prints the RSS kept after the free, in MiB.
PROBE = """
import ctypes, sys
from pathlib import Path
from dpokit.model.host_memory import fix_mmap_threshold
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
def rss():
    return next(int(x.split()[1]) for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmRSS"))
if sys.argv[1] == "fixed":
    assert fix_mmap_threshold(65536)
libc.free(libc.malloc(20 << 20))
before = rss()
a = libc.malloc(10 << 20)
ctypes.memset(a, 1, 10 << 20)
pin = libc.malloc(4096)
libc.free(a)
print((rss() - before) / 1024)
"""

glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or "glibc" not in " ".join(__import__("platform").libc_ver()),
                           reason="glibc's malloc only")


def _kept_mib(mode: str) -> float:
    return float(subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True).stdout)


@glibc
def test_freed_large_blocks_leave_the_process_with_the_threshold_fixed():
    assert _kept_mib("adaptive") > 8  # glibc's default keeps the freed 10 MiB resident
    assert _kept_mib("fixed") < 2


def test_zero_leaves_malloc_alone():
    assert fix_mmap_threshold(0) is False


def test_a_negative_threshold_is_a_one_line_error(tmp_path, capsys):
    model = save_tiny_model(tmp_path / "model")
    data = write_jsonl(tmp_path / "train.jsonl", make_pairs(4, seed=1))
    capsys.readouterr()  # the model writer's progress lines
    code = main(["train", "--model", str(model), "--data", str(data), "--output", str(tmp_path / "o"),
                 "--max-steps", "1", "--progress", "off", "--malloc-mmap-threshold", "-1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--malloc-mmap-threshold" in err[0], err
