"""`--memory-budget` against hand-chosen settings, on the real model and the bench model.

    PYTHONPATH=src .venv/bin/python benchmarks/memory_budget.py --json budget.json
    PYTHONPATH=src .venv/bin/python benchmarks/memory_budget.py --models bench --steps 2   # minutes

Per model (the real SmolLM2-135M-Instruct of benchmarks/real_model.py, on pairs of about
`--length` tokens per sequence cut from real UltraFeedback text; the bench model of
bench_vs_trl.py, MAIN shape, on its random word pairs of the same length), per-step batch 4:

1. The hand grid: every setting the planner may choose (micro-batch 4, 2, 1 x no lever, selective
   recompute, gradient checkpointing, + the malloc threshold at 1 MiB), each a short `dpokit train` run in its own
   process with those flags given by hand (no --memory-budget): its whole-process peak RSS
   (`wait4`'s ru_maxrss) and its step time (the median over its steps after the first, from
   metrics.jsonl's throughput: the first step warms up).
2. Three budgets from the grid's peaks (above the largest, between, just above the smallest
   over the margin): `dpokit data inspect --memory-budget` makes the plan (the probes, timed),
   and the plan's setting is looked up in the grid: its measured peak against the budget, its
   step time against the fastest hand setting whose peak is within the budget.

The probe's cost is given against a 100-step run at the chosen setting's measured step time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_length import length_spec
from bench_real import SHARED, long_rows
from bench_real import prepare as prepare_real
from bench_vs_trl import MAIN
from bench_vs_trl import prepare as prepare_bench

BATCH = 4
MARGIN = 0.10  # dpokit.train.memory_plan.MARGIN (budgets below are spread from it)
LEVELS = {"none": [], "selective": ["--selective-recompute"], "ckpt": ["--gradient-checkpointing"],
          "ckpt+malloc": ["--gradient-checkpointing", "--malloc-mmap-threshold", str(1 << 20)]}
PLAN = re.compile(r"memory plan: micro-batch (\d+) x accumulation (\d+) .*?, (.*?); probed peak ([\d.]+) GiB .*"
                  r"(\d+) probe\(s\) in (\d+) s")


def run(cmd: list[str], env: dict) -> tuple[int, int, float, str]:
    """Exit status, peak RSS (bytes, the process and any children it waited for), wall s, output."""
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out:
        child = subprocess.Popen(["nice", "-n", "10", *cmd], stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        return child.returncode, usage.ru_maxrss * 1024, time.perf_counter() - started, out.read()


def train_run(folder: Path, max_length: int, steps: int, env: dict, micro: int, level: str) -> dict:
    """A short `dpokit train` at micro-batch `micro` and lever `level`, given by hand: peak and step time."""
    out = folder / f"run-{micro}-{level}"
    cmd = [sys.executable, "-m", "dpokit", "train", "--model", str(folder / "model"), "--data",
           str(folder / "pairs.jsonl"), "--output", str(out), "--overwrite", "--max-length", str(max_length),
           "--batch-size", str(micro), "--gradient-accumulation-steps", str(BATCH // micro),
           "--max-steps", str(steps), "--progress", "off", "--learning-rate", "1e-6", *LEVELS[level]]
    rc, peak, wall, text = run(cmd, env)
    if rc != 0:
        raise SystemExit(f"run {micro} {level} failed:\n{text[-2000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = sorted(BATCH / r["throughput/pairs_per_s"] for r in records[1:] or records)  # step 1 warms up
    found = {"micro_batch": micro, "level": level, "peak": peak, "wall_s": wall, "step_s": timed[len(timed) // 2]}
    print(f"  run micro-batch {micro} {level:12}: peak {peak / 2**30:.2f} GiB, step {found['step_s']:.2f} s, "
          f"wall {wall:.0f} s", flush=True)
    return found


def grid(folder: Path, max_length: int, steps: int, env: dict) -> dict:
    return {f"{micro} {level}": train_run(folder, max_length, steps, env, micro, level)
            for micro in (4, 2, 1) for level in LEVELS}


def plan(folder: Path, max_length: int, budget: int, env: dict) -> dict:
    cmd = [sys.executable, "-m", "dpokit", "data", "inspect", str(folder / "pairs.jsonl"), "--model",
           str(folder / "model"), "--max-length", str(max_length), "--batch-size", str(BATCH),
           "--memory-budget", str(budget)]
    rc, _, wall, text = run(cmd, env)
    line = next((x for x in text.splitlines() if x.startswith("memory plan:") or "no plan fits" in x), text[-300:])
    match = PLAN.search(line)
    if rc != 0 or not match:
        return {"budget": budget, "refused": line, "wall_s": wall}
    levers = match.group(3)
    level = ("ckpt+malloc" if "malloc" in levers else "ckpt" if "checkpointing" in levers
             else "selective" if "selective recompute" in levers else "none")
    return {"budget": budget, "line": line, "micro_batch": int(match.group(1)), "level": level,
            "probed_peak": float(match.group(4)) * 2**30, "probes": int(match.group(5)),
            "probe_s": float(match.group(6)), "wall_s": wall}


def compare(found: dict, planned: dict) -> dict:
    if "refused" in planned:
        return planned
    chosen = found[f"{planned['micro_batch']} {planned['level']}"]
    fitting = [g for g in found.values() if g["peak"] <= planned["budget"]]
    best = min(fitting, key=lambda g: g["step_s"]) if fitting else None
    hundred = 100 * chosen["step_s"]
    return {**planned, "run_peak": chosen["peak"], "fits": chosen["peak"] <= planned["budget"],
            "probe_vs_run_peak": planned["probed_peak"] / chosen["peak"], "step_s": chosen["step_s"],
            "probe_share_of_100_steps": planned["probe_s"] / hundred,
            "best_hand": best and {"setting": f"{best['micro_batch']} {best['level']}", "step_s": best["step_s"],
                                   "peak": best["peak"]}}


def planned_run(folder: Path, max_length: int, steps: int, env: dict, size: str) -> dict:
    """Plan at `size`, then run the plan's setting by hand: its peak against the budget."""
    from dpokit.config.parsers import parse_memory_budget

    planned = plan(folder, max_length, parse_memory_budget(size), env)
    print(f"  plan at {size}: {planned.get('line') or planned.get('refused')}", flush=True)
    if "refused" in planned:
        return planned
    found = {f"{planned['micro_batch']} {planned['level']}": train_run(folder, max_length, steps, env,
                                                                       planned["micro_batch"], planned["level"])}
    return compare(found, planned)


def budgets(found: dict) -> list[int]:
    peaks = sorted(g["peak"] for g in found.values())
    low, high = peaks[0] / (1 - MARGIN) * 1.05, peaks[-1] / (1 - MARGIN) * 1.1
    return [int(high), int((low * high) ** 0.5), int(low)]


def prepare(name: str, scratch: Path, length: int) -> tuple[Path, int]:
    folder = scratch / name
    if name == "bench":
        prepare_bench(folder, length_spec(MAIN, length))
        return folder, length + 64
    from transformers import AutoTokenizer

    model = Path(subprocess.check_output([sys.executable, str(Path(__file__).parent / "real_model.py")],
                                         text=True).strip().splitlines()[-1])
    rows, lengths = long_rows(SHARED, AutoTokenizer.from_pretrained(model), length, 8)
    prepare_real(folder, model, rows, lengths)
    return folder, max(p + max(c, r) for p, c, r in lengths) + 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="bench,real")
    parser.add_argument("--length", type=int, default=768)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--json")
    parser.add_argument("--budgets", help="comma list of sizes (8GiB,...): no hand grid; each plan's setting is "
                        "run once by hand instead (for a model too slow for the grid)")
    parser.add_argument("--grid-from", help="an earlier --json report: reuse its hand grid, plan again")
    args = parser.parse_args()
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    scratch = Path(tempfile.mkdtemp(prefix="dpokit-budget-bench-"))
    report = {"load_before": os.getloadavg()}
    for name in args.models.split(","):
        folder, max_length = prepare(name, scratch, args.length)
        print(f"{name}: pairs of about {args.length} tokens per sequence, max length {max_length}", flush=True)
        if args.budgets:
            rows = [planned_run(folder, max_length, args.steps, env, size) for size in args.budgets.split(",")]
        else:
            earlier = json.loads(Path(args.grid_from).read_text()) if args.grid_from else {}
            found = earlier[name]["grid"] if name in earlier else grid(folder, max_length, args.steps, env)
            rows = [compare(found, plan(folder, max_length, b, env)) for b in budgets(found)]
        for r in rows:
            print(f"  budget {r['budget'] / 2**30:.2f} GiB: {json.dumps({k: v for k, v in r.items() if k != 'budget'})}",
                  flush=True)
        report[name] = {"grid": None if args.budgets else found, "budgets": rows}
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1))
    report["load_after"] = os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
