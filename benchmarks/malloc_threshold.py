"""What fixing malloc's mmap threshold saves and costs, by sequence length (`--malloc-mmap-threshold`).

    PYTHONPATH=src .venv/bin/python benchmarks/malloc_threshold.py --lengths 1024,2048,4096 --repeats 2

For each length L: the length section's data (bench_length.length_spec: 4 pairs whose prompt and
responses are each about L/2 tokens, the bench Llama), repeated so a run has 8 steps at L <= 2048
and 4 at longer L (same tokens per run), trained by `dpokit train` in its own process with batch
2, gradient checkpointing and each threshold in turn (0 = glibc's adaptive threshold; the
configurations alternate, so a busy spell hits each alike). Reported per run: wall seconds, user
and system CPU seconds and the peak RSS, all from the kernel (`wait4`'s rusage of the child).
The whole run is measured, set-up included (imports, layout check, reference pass).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_length import length_spec
from bench_vs_trl import MAIN, prepare


def one_run(folder: Path, data: Path, length: int, steps: int, threshold: int, threads: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "dpokit", "train", "--model", str(folder / "model"), "--data", str(data),
           "--max-length", str(length + 64), "--batch-size", "2", "--max-steps", str(steps), "--learning-rate", "5e-6",
           "--lr-scheduler", "constant", "--progress", "off", "--gradient-checkpointing",
           "--malloc-mmap-threshold", str(threshold), "--output", str(out), "--overwrite"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    if status != 0:
        raise RuntimeError(f"dpokit train failed at {length} tokens: {proc.stderr.read().decode()[-2000:]}")
    return {"wall_s": wall, "user_s": usage.ru_utime, "sys_s": usage.ru_stime, "peak_rss_mb": usage.ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024,2048,4096")
    parser.add_argument("--thresholds", default=f"0,{2**20}", help="bytes; 0 = malloc's adaptive threshold")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="dpokit-malloc-"))
    thresholds = [int(t) for t in args.thresholds.split(",")]
    print(f"{'tokens':>6} {'threshold':>9} {'wall s':>7} {'user s':>7} {'sys s':>6} {'peak RSS MB':>11}   (medians)")
    for length in map(int, args.lengths.split(",")):
        folder = scratch / f"len{length}"
        prepare(folder, length_spec(MAIN, length))
        copies = 4 if length <= 2048 else 2
        rows = (folder / "pairs.jsonl").read_text().splitlines()
        data = folder / "repeated.jsonl"
        data.write_text("\n".join(rows * copies) + "\n")
        steps = len(rows) * copies // 2
        runs: dict[int, list[dict]] = {t: [] for t in thresholds}
        for _ in range(args.repeats):
            for t in thresholds:
                runs[t].append(one_run(folder, data, length, steps, t, args.threads, scratch / "run"))
        for t in thresholds:
            med = {k: statistics.median(r[k] for r in runs[t]) for k in runs[t][0]}
            each = ", ".join(f"{r['wall_s']:.1f}" for r in runs[t])
            print(f"{length:6d} {t:9d} {med['wall_s']:7.1f} {med['user_s']:7.1f} {med['sys_s']:6.1f} "
                  f"{med['peak_rss_mb']:11.0f}   (wall of each run: {each})", flush=True)


if __name__ == "__main__":
    main()
