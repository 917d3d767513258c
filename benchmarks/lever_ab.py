"""One dpokit training run on the real model with a speed or memory lever switched in or out, for
side-by-side A/B runs of levers that have no option of their own (benchmarks/RESULTS.md section 9).

    .venv/bin/python benchmarks/lever_ab.py 768 16 3 ckpt            # checkpointing as dpokit runs it
    .venv/bin/python benchmarks/lever_ab.py 768 16 3 ckpt+unfused    # ... with torch's default AdamW loop
    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 .venv/bin/python benchmarks/lever_ab.py 2048 8 1 ckpt  # THP

Arguments: max length, pairs (the first usable rows of bench_real.py), timed steps (after one
warm-up; batch 4), and the variant: levers joined by "+" from
  ckpt        --gradient-checkpointing
  unfused     AdamW as torch picks it on the CPU (its per-tensor loop), not the fused kernel
  attn        checkpointing keeps each layer's attention-kernel outputs (selective-checkpoint
              policy) instead of recomputing attention in the backward
  malloc0     --malloc-mmap-threshold 0 (malloc's adaptive threshold)
  t16         --malloc-mmap-threshold 16 MiB
  t8          --malloc-mmap-threshold 8 MiB
  sel         --selective-recompute
  trim        glibc's malloc_trim(0) after every optimizer step (hands the heap's free pages back)
  compile     --compile (torch.compile of the model body, dynamic shapes)
  mb1, mb2    micro-batches of 1 or 2 pairs, accumulated to the same 4 pairs per optimizer step
  none        nothing: dpokit's defaults
One JSON line: pairs/s over the timed steps, whole-process peak RSS, the first losses, timed CPU
seconds, the process's user and system seconds and minor page faults, and where the peak was
reached: the resident set is sampled every 20 ms, and the highest sample between each log line
and the next is reported beside that line (where set-up or a step reaches its peak). One run per
process.
"""

from __future__ import annotations

import functools
import json
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_real  # noqa: E402
import bench_vs_trl  # noqa: E402
from real_model import real_model_folder  # noqa: E402

LEVERS = {"ckpt", "unfused", "attn", "malloc0", "t16", "t8", "sel", "trim", "mb1", "mb2", "compile", "none"}


class ResidentSampler:
    """Samples this process's resident set (VmRSS) every `period` seconds on a thread of its own."""

    def __init__(self, period: float = 0.02) -> None:
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period,), daemon=True)

    def _run(self, period: float) -> None:
        status = Path("/proc/self/status")
        while not self._stop.wait(period):
            kb = next(int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("VmRSS:"))
            self.samples.append((time.perf_counter(), kb / 1024))

    def __enter__(self) -> ResidentSampler:
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()

    def peak_mb(self, start: float = float("-inf"), end: float = float("inf")) -> float:
        return max((mb for t, mb in self.samples if start <= t < end), default=0.0)


def patch(levers: set[str]) -> None:
    """Switch out, in this process, the levers dpokit has no option for."""
    import torch

    import dpokit.model.load as load
    from dpokit.model import recompute

    if "attn" in levers:
        attention = frozenset(op for op in recompute.saved_ops() if "attention" in str(op))
        load.checkpoint_kwargs = lambda selective: {
            "use_reentrant": False, "context_fn": functools.partial(recompute._contexts, attention)}
    if "unfused" in levers:
        class LoopAdamW(torch.optim.AdamW):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **{**kwargs, "fused": False, "foreach": False})

        torch.optim.AdamW = LoopAdamW
    if "trim" in levers:
        import ctypes

        from torch.optim.optimizer import register_optimizer_step_post_hook

        malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        register_optimizer_step_post_hook(lambda *_: malloc_trim(0))


def main() -> None:
    length, pairs, steps, variant = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    levers = set(variant.split("+"))
    if levers - LEVERS:
        raise SystemExit(f"unknown lever(s) {', '.join(sorted(levers - LEVERS))}: choose from {', '.join(sorted(LEVERS))}")
    from transformers import AutoTokenizer

    model = real_model_folder()
    folder = Path(tempfile.gettempdir()) / f"dpokit-lever-ab-{length}-{pairs}"
    rows, lengths = bench_real.usable_rows(bench_real.SHARED, AutoTokenizer.from_pretrained(model), length, pairs)
    bench_real.prepare(folder, model, rows, lengths)
    patch(levers)
    scale: dict = {"gradient_checkpointing": True} if "ckpt" in levers else {}
    if "malloc0" in levers:
        scale["malloc_mmap_threshold"] = "0"
    if "t16" in levers:
        scale["malloc_mmap_threshold"] = str(16 << 20)
    if "t8" in levers:
        scale["malloc_mmap_threshold"] = str(8 << 20)
    if "sel" in levers:
        scale["selective_recompute"] = True
    micro = 1 if "mb1" in levers else 2 if "mb2" in levers else 4
    with tempfile.TemporaryDirectory() as scratch, ResidentSampler() as rss:
        run = bench_vs_trl.worker_dpokit(folder, {"threads": 2, "warmup": 1, "steps": steps, "batch": 4,
                                                  "micro_batch": micro, "max_length": length,
                                                  "scratch": scratch, "scale": scale,
                                                  "speed": {"compile": True} if "compile" in levers else {}})
    phases = [(t, line[:60]) for t, line in run["said"]]
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"variant": variant, "length": length, "pairs_per_s": 4 * steps / run["timed_s"],
                      "peak_rss_mb": run["peak_rss_mb"],
                      "sampled_peak_by_phase_mb": [
                          [line, rss.peak_mb(start=t, end=phases[i + 1][0] if i + 1 < len(phases) else float("inf"))]
                          for i, (t, line) in enumerate(phases)] + [["before any line", rss.peak_mb(end=phases[0][0])]],
                      "losses": run["losses"][:3],
                      "timed_cpu_s": run["timed_cpu_s"], "user_s": usage.ru_utime, "system_s": usage.ru_stime,
                      "minor_faults": usage.ru_minflt}))


if __name__ == "__main__":
    main()
