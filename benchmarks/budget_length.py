"""The longest pair that trains under a memory cap, found by real capped runs (bisection on length).

    PYTHONPATH=src .venv/bin/python benchmarks/budget_length.py --budget-mb 3072

Each try is one worker of bench_vs_trl.py (the "length" section's data and settings: 4 pairs whose
prompt and responses are each about L/2 tokens, batch 2, 1 warm-up + 1 timed step, gradient
checkpointing, each tool in its most frugal setting) run in its own process under a cap:

- `--cap rss` (default): a watchdog reads the worker's resident set (`/proc/PID/status` VmRSS)
  every 20 ms and kills it above the budget; a try fits when the worker finishes and its peak
  RSS as the kernel counts it (`wait4`'s `ru_maxrss`, the high-water mark, so a spike between two
  readings still counts) is within the budget.
- `--cap as`: `resource.setrlimit(RLIMIT_AS)` on the worker; a try fits when it finishes.
  RLIMIT_AS caps virtual address space, which includes mapped but untouched memory (shared
  libraries, thread stacks, allocator reservations), so it is stricter than an RSS budget of the
  same size and hits the tools unequally (see RESULTS.md, section 5).

Bisection assumes memory grows with length: it verifies that `--lo` fits and `--hi` does not,
then halves the interval down to `--step` tokens. Every try is printed as it ends.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench_length import BATCH, STEPS, WARMUP, length_configs, length_spec
from bench_vs_trl import HERE, MAIN, prepare


def _watch_rss(proc: subprocess.Popen, budget_kb: int, killed: list[bool]) -> None:
    status = Path(f"/proc/{proc.pid}/status")
    while proc.poll() is None:
        try:
            rss = next(int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("VmRSS:"))
        except (OSError, StopIteration, ValueError):
            return
        if rss > budget_kb:
            killed[0] = True
            proc.kill()
            return
        time.sleep(0.02)


def capped_try(python: str, kind: str, folder: Path, opts: dict, budget_mb: int, cap: str) -> dict:
    """One capped worker run: whether it fit, its peak RSS (MB) and, when it finished, its losses."""
    env = {**os.environ, "OMP_NUM_THREADS": str(opts["threads"]), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
           "PYTHONWARNINGS": "ignore", **opts.get("env", {})}
    limit = budget_mb * 2**20

    def as_cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    started = time.perf_counter()
    proc = subprocess.Popen([python, str(HERE), "--worker", kind, "--folder", str(folder), "--opts", json.dumps(opts)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=as_cap if cap == "as" else None)
    killed = [False]
    if cap == "rss":
        threading.Thread(target=_watch_rss, args=(proc, budget_mb * 1024, killed), daemon=True).start()
    out, err = proc.communicate()
    # communicate() reaped the child; its rusage is the only one in RUSAGE_CHILDREN that can grow
    # past the previous maximum, so read this try's peak from the worker's own report when it
    # finished and from the kernel's children high-water mark otherwise.
    result = next((json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")), None)
    peak = result["peak_rss_mb"] if result else resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    fits = proc.returncode == 0 and result is not None and (cap == "as" or peak <= budget_mb)
    reason = "" if fits else "killed by the RSS watchdog" if killed[0] else (err.strip().splitlines() or ["?"])[-1][:160]
    return {"fits": fits, "peak_rss_mb": peak, "peak_vm_mb": result.get("peak_vm_mb") if result else None,
            "losses": result["losses"] if result else None, "wall_s": time.perf_counter() - started, "why": reason}


def bisect(name: str, args, scratch: Path) -> dict:
    tries: dict[int, dict] = {}

    def attempt(length: int) -> bool:
        folder = scratch / f"len{length}"
        if not (folder / "pairs.jsonl").exists():
            prepare(folder, length_spec(MAIN, length))
        _, python, kind, extra = next(c for c in length_configs(sys.executable, args.trl_python, length) if c[0] == name)
        opts = {"threads": args.threads, "steps": STEPS, "warmup": WARMUP, "batch": BATCH, "device": "cpu",
                "dtype": "fp32", "scratch": str(scratch / "runs"), **extra}
        tries[length] = capped_try(python, kind, folder, opts, args.budget_mb, args.cap)
        t = tries[length]
        print(f"{name:36} {length:6d} tokens: {'fits' if t['fits'] else 'does not fit':12} peak RSS "
              f"{t['peak_rss_mb']:6.0f} MB  VM {t['peak_vm_mb'] or 0:6.0f} MB  {t['wall_s']:6.0f} s  {t['why']}",
              flush=True)
        return t["fits"]

    lo, hi = args.lo, args.hi
    if not attempt(lo):
        return {"longest": None, "tries": tries}
    if attempt(hi):
        return {"longest": f">= {hi}", "tries": tries}
    while hi - lo > args.step:
        mid = (lo + hi) // 2 // args.step * args.step
        mid = mid if lo < mid < hi else lo + args.step
        lo, hi = (mid, hi) if attempt(mid) else (lo, mid)
    print(f"{name}: longest that fits {args.budget_mb} MB ({args.cap} cap): {lo} tokens (next try {hi} did not)",
          flush=True)
    return {"longest": lo, "first_fail": hi, "tries": tries}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="all", help="comma list of bench_length.length_configs names, or all")
    parser.add_argument("--trl-python", default="/tmp/trlenv/bin/python")
    parser.add_argument("--budget-mb", type=int, default=3072)
    parser.add_argument("--cap", choices=("rss", "as"), default="rss")
    parser.add_argument("--lo", type=int, default=4096, help="a length expected to fit (verified)")
    parser.add_argument("--hi", type=int, default=8192, help="a length expected not to fit (verified)")
    parser.add_argument("--step", type=int, default=256, help="bisection resolution in tokens")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write every try to this file")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="dpokit-budget-"))
    names = [c[0] for c in length_configs(sys.executable, args.trl_python, args.lo)]
    report = {}
    for name in names if args.configs == "all" else args.configs.split(","):
        report[name] = bisect(name, args, scratch)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
