"""--malloc-mmap-threshold: freed blocks at or above the threshold leave the process (glibc); auto
fixes it on the CPU only: for long rows, and (higher) for shorter ones under gradient checkpointing."""

import subprocess
import sys

import pytest

from dpokit.cli import main
from dpokit.model.host_memory import (
    AUTO_CHECKPOINTING_THRESHOLD,
    AUTO_MIN_ROW_TOKENS,
    AUTO_THRESHOLD,
    fix_mmap_threshold,
    threshold_for,
)
from helpers.toy import build_tiny_llama, build_tokenizer, make_pairs, save_tiny_model, write_jsonl

# In a fresh process: a 20 MiB block freed (glibc's adaptive threshold rises to 20 MiB), then a
# touched 10 MiB block with a small block after it, freed: under the adaptive threshold it sat
# in the heap below the small block and stays resident; with the threshold fixed it was its own
# mapping and goes back. Prints the RSS kept after the free, in MiB.
PROBE = """
import ctypes, sys
from pathlib import Path
from dpokit.model.host_memory import AUTO_MIN_ROW_TOKENS, AUTO_THRESHOLD, fix_mmap_threshold, threshold_for
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


def test_auto_fixes_it_for_long_rows_on_the_cpu_only():
    assert threshold_for(None, AUTO_MIN_ROW_TOKENS, "cpu") == AUTO_THRESHOLD
    assert threshold_for(None, AUTO_MIN_ROW_TOKENS - 1, "cpu") == 0  # short rows keep malloc's adaptive threshold
    assert threshold_for(None, 10 * AUTO_MIN_ROW_TOKENS, "cuda") == 0  # activations are not in host memory there
    assert threshold_for(0, 10 * AUTO_MIN_ROW_TOKENS, "cpu") == 0  # 0: never, whatever the rows
    assert threshold_for(65536, 10, "cpu") == 65536  # a number: always that


def test_auto_fixes_a_higher_threshold_for_short_rows_under_checkpointing():
    short = AUTO_MIN_ROW_TOKENS - 1
    assert threshold_for(None, short, "cpu", checkpointing=True) == AUTO_CHECKPOINTING_THRESHOLD
    assert AUTO_THRESHOLD < AUTO_CHECKPOINTING_THRESHOLD < 32 << 20  # below the adaptive threshold's ceiling
    assert threshold_for(None, AUTO_MIN_ROW_TOKENS, "cpu", checkpointing=True) == AUTO_THRESHOLD  # long rows: 1 MiB
    assert threshold_for(None, short, "cuda", checkpointing=True) == 0
    assert threshold_for(0, short, "cpu", checkpointing=True) == 0  # 0: never


@pytest.mark.parametrize("value", ["-1", "1.5", "lots", ""])
def test_a_bad_threshold_is_a_one_line_error(tmp_path, capsys, value):
    model = save_tiny_model(tmp_path / "model")
    data = write_jsonl(tmp_path / "train.jsonl", make_pairs(4, seed=1))
    capsys.readouterr()  # the model writer's progress lines
    code = main(["train", "--model", str(model), "--data", str(data), "--output", str(tmp_path / "o"),
                 "--max-steps", "1", "--progress", "off", "--malloc-mmap-threshold", value])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--malloc-mmap-threshold" in err[0], err
    assert not (tmp_path / "o").exists()  # refused before anything was written


@glibc
@pytest.mark.parametrize("words, setting, checkpointing, fixed", [
    (1600, "auto", False, AUTO_THRESHOLD), (1600, "0", False, 0), (40, "auto", False, 0),
    (40, "auto", True, AUTO_CHECKPOINTING_THRESHOLD), (40, "0", True, 0)])
def test_train_fixes_the_threshold_only_where_auto_sees_long_rows_or_checkpointing(tmp_path, words, setting,
                                                                                  checkpointing, fixed):
    """Through `dpokit train` in its own process (the setting is process-wide): the one log line
    says the threshold was fixed (mallopt succeeded) and at what, for rows of >= 3072 tokens and,
    higher, for shorter rows under gradient checkpointing."""
    tokenizer = build_tokenizer("word")
    model = build_tiny_llama(tokenizer)
    model.config.max_position_embeddings = 4096  # the 3.2k-token rows fit without truncation
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    model = tmp_path / "model"
    rows = [{"prompt": " ".join(["good"] * words), "chosen": " " + " ".join(["great"] * words),
             "rejected": " " + " ".join(["bad"] * words)} for _ in range(2)]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    proc = subprocess.run([sys.executable, "-m", "dpokit", "train", "--model", str(model), "--data", str(data),
                           "--output", str(tmp_path / "o"), "--max-steps", "1", "--batch-size", "2", "--progress", "off",
                           "--max-length", "4096", "--malloc-mmap-threshold", setting,
                           *(["--gradient-checkpointing"] if checkpointing else [])],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    said = [line for line in proc.stdout.splitlines() if "--malloc-mmap-threshold auto" in line]
    assert len(said) == int(fixed > 0), proc.stdout
    if fixed:
        assert f"blocks of {fixed >> 20} MiB" in said[0]
        assert ("up to 3" if words > 100 else "gradient checkpointing") in said[0]
