"""dpokit and TRL 1.16 side by side on the real model: SmolLM2-135M-Instruct (benchmarks/
real_model.py) and real UltraFeedback rows, fp32 on the CPU.

    .venv/bin/python benchmarks/bench_real.py --json real.json                 # the table (hours)
    .venv/bin/python benchmarks/bench_real.py --sections memory --plot benchmarks/real_memory_vs_length.png
    .venv/bin/python benchmarks/bench_real.py --smoke                          # minutes: 2 steps, length 128

Rows: the first usable rows of ../shared/data/preferences/ultrafeedback_binarized_train_prefs_500.jsonl
(HuggingFaceH4/ultrafeedback_binarized train_prefs; the shared samples hold no test split): one
user message and one assistant reply each, rows dpokit keeps (not identical, not empty), and whose
longest sequence, rendered with the model's ChatML template, fits --max-length (so neither tool
truncates and both see the same text). Written with an explicit prompt (`prompt` = the user
message, `chosen` / `rejected` = the reply), which both tools read as conversational rows.

Per max length (768 and 2048) and configuration (each tool with and without gradient
checkpointing; TRL always with `precompute_ref_log_probs`, its faster reference, at micro-batch 4
and at micro-batch 1 (4 micro-batches of one pair accumulated to the same step: TRL's fastest and
leanest on this CPU, RESULTS.md section 9); dpokit's defaults; dpokit at micro-batch 1, alone and
with `--selective-recompute`, checkpointing, or checkpointing and the malloc threshold fixed at
1 MiB; dpokit with `--selective-recompute`; dpokit with checkpointing and malloc's adaptive
threshold, as auto left it before it fixed 8 MiB under checkpointing; and dpokit with
checkpointing and the malloc threshold fixed at 1 MiB, the memory planner's CPU lever; `--only`
picks some by name), one process
per run (bench_vs_trl.py's workers, one after another, `--threads` threads each): training pairs/s
and tokens/s over the timed steps (after `--warmup`; TRL's precompute pass and dpokit's cached
reference pass are not in them), whole-process peak RSS and wall time (start to exit, loading and
reference pass included), the first losses, and model FLOP/s as a share of the fp32 GEMM peak.

GEMM peak: the median rate of a 2048 x 2048 fp32 `torch.matmul` in a process with the same threads,
measured before every round. Model FLOPs (bench_vs_trl.model_flops_per_pair): per pair, for each
of chosen and rejected, 6 x body parameters (q, k, v, o, gate, up, down of every layer: 106.2M)
per token of prompt + response, 6 x LM-head parameters (49,152 x 576) per response token (the
logits the loss needs), and causal attention 6 x layers x hidden x n^2 (QK^T and AV, forward and
backward, halved by the causal mask); the reference forward is not counted. A tool that computes
more (the prompt's logits) gets no credit for it; the prompt is counted once per sequence, so a
tool that runs it once per pair (dpokit's prefix-shared rows) is credited with work it skipped
and its share reads above its hardware use (by about a fifth on these rows: RESULTS.md section 9).

`--sections memory`: peak RSS against pair length (512 to 4096 tokens per sequence: prompt and
each reply about half, cut from real UltraFeedback text), batch 2, 4 pairs, 1 warm-up + 1 timed
step, both tools with gradient checkpointing; table, slopes and --plot as bench_length.py.

Timings on a shared machine are not figures: run this on an otherwise idle one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_length import summarise_lengths  # noqa: E402
from bench_vs_trl import dpokit_order, run_worker, summarise  # noqa: E402
from real_model import real_model_folder  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "preferences"  # ../shared of the checkout
ROWS_FILE = "ultrafeedback_binarized_train_prefs_500.jsonl"
LONG_SOURCE = "ultrafeedback_trl_standard_train1000.jsonl"  # text for the memory-vs-length pairs
MEMORY_LENGTHS = (512, 1024, 2048, 4096)


# ----------------------------------------------------------------------------- rows
def usable_rows(shared: Path, tokenizer, max_length: int, count: int) -> tuple[list[dict], list[tuple[int, int, int]]]:
    """The first `count` usable rows (module docstring) and their dpokit token counts (prompt,
    chosen, rejected), in file order."""
    from dpokit.config import DataConfig
    from dpokit.data import read_pairs
    from dpokit.data.tokenize import PairTokenizer

    pair_tokenizer = PairTokenizer(tokenizer, max_length=10**6)
    rows, lengths = [], []
    for pair in read_pairs(str(shared / ROWS_FILE), DataConfig()):
        if len(rows) == count:
            break
        single = all(len(side) == 1 and side[0]["role"] == "assistant" for side in (pair.chosen, pair.rejected))
        if not single or len(pair.prompt) != 1:
            continue
        tokenized, _ = pair_tokenizer.tokenize([pair])
        if not tokenized:
            continue
        tp = tokenized[0]
        if len(tp.prompt_ids) + max(len(tp.chosen_ids), len(tp.rejected_ids)) > max_length:
            continue
        rows.append({"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected})
        lengths.append((len(tp.prompt_ids), len(tp.chosen_ids), len(tp.rejected_ids)))
    if len(rows) < count:
        raise SystemExit(f"only {len(rows)} usable rows of {ROWS_FILE} fit {max_length} tokens; asked for {count}")
    return rows, lengths


def long_rows(shared: Path, tokenizer, length: int, count: int) -> tuple[list[dict], list[tuple[int, int, int]]]:
    """`count` pairs whose every sequence is about `length` tokens: the prompt and each reply cut
    to length/2 tokens from real UltraFeedback text (prompts, chosen and rejected replies of the
    trl-lib sample, joined end to end), rendered with the chat template."""
    from dpokit.data.pairs import PreferencePair
    from dpokit.data.tokenize import PairTokenizer

    source = [json.loads(line) for line in (shared / LONG_SOURCE).read_text(encoding="utf-8").splitlines()]
    streams = {field: tokenizer("\n\n".join(r[field] for r in source))["input_ids"]
               for field in ("prompt", "chosen", "rejected")}
    half = length // 2 - 24  # room for the template's system, user and assistant lines
    rows, lengths = [], []
    for i in range(count):
        text = {f: tokenizer.decode(ids[i * half:(i + 1) * half]) for f, ids in streams.items()}
        row = {"prompt": [{"role": "user", "content": text["prompt"]}],
               "chosen": [{"role": "assistant", "content": text["chosen"]}],
               "rejected": [{"role": "assistant", "content": text["rejected"]}]}
        pair = PreferencePair(row["prompt"], row["chosen"], row["rejected"], i)
        tp = PairTokenizer(tokenizer, max_length=10**6).tokenize([pair])[0][0]
        rows.append(row)
        lengths.append((len(tp.prompt_ids), len(tp.chosen_ids), len(tp.rejected_ids)))
    return rows, lengths


def prepare(folder: Path, model: Path, rows: list[dict], lengths: list[tuple[int, int, int]]) -> dict:
    """The layout bench_vs_trl.py's workers read: model/, pairs.jsonl, order.json (dpokit's epoch
    order, which TRL follows with a sequential sampler)."""
    from transformers import AutoConfig

    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "model").exists():
        (folder / "model").symlink_to(model, target_is_directory=True)
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                        encoding="utf-8")
    order = dpokit_order(len(rows))
    (folder / "order.json").write_text(json.dumps(order))
    return {"lengths": lengths, "order": order, "config": AutoConfig.from_pretrained(model).to_dict()}


# ----------------------------------------------------------------------------- runs
def configs(me: str, trl: str | None, max_length: int) -> list[tuple[str, str | None, str, dict]]:
    common = {"max_length": max_length}
    return [
        ("TRL precompute_ref_log_probs", trl, "trl", {**common, "precompute": True}),
        ("TRL precompute + grad ckpt", trl, "trl", {**common, "precompute": True, "gradient_checkpointing": True}),
        # Micro-batches of one pair, accumulated to the same batch per optimizer step: same loss, same
        # update (up to the order of float sums), a quarter of the activations alive at once.
        ("TRL precompute + micro-batch 1", trl, "trl", {**common, "precompute": True, "micro_batch": 1}),
        ("TRL precompute + micro-batch 2", trl, "trl", {**common, "precompute": True, "micro_batch": 2}),
        ("TRL precompute + micro-batch 1 + grad ckpt", trl, "trl",
         {**common, "precompute": True, "micro_batch": 1, "gradient_checkpointing": True}),
        ("dpokit defaults", me, "dpokit", common),
        ("dpokit micro-batch 1", me, "dpokit", {**common, "micro_batch": 1}),
        ("dpokit micro-batch 1 + selective", me, "dpokit",
         {**common, "micro_batch": 1, "scale": {"selective_recompute": True}}),
        ("dpokit micro-batch 1 + grad ckpt", me, "dpokit",
         {**common, "micro_batch": 1, "scale": {"gradient_checkpointing": True}}),
        ("dpokit micro-batch 1 + ckpt + malloc 1 MiB", me, "dpokit",
         {**common, "micro_batch": 1, "scale": {"gradient_checkpointing": True, "malloc_mmap_threshold": str(1 << 20)}}),
        # Matmul and attention outputs kept, the elementwise work recomputed (model/recompute.py).
        ("dpokit + selective recompute", me, "dpokit", {**common, "scale": {"selective_recompute": True}}),
        ("dpokit defaults + grad ckpt", me, "dpokit", {**common, "scale": {"gradient_checkpointing": True}}),
        # Auto fixes malloc's threshold at 8 MiB under checkpointing (model/host_memory.py): this row
        # is the same run with the adaptive threshold, the lever's effect side by side.
        ("dpokit + ckpt + adaptive malloc", me, "dpokit",
         {**common, "scale": {"gradient_checkpointing": True, "malloc_mmap_threshold": "0"}}),
        # The malloc lever the memory planner pulls (docs/memory-budget.md): freed blocks of 1 MiB or
        # more go back to the system instead of staying in the adaptive heap (model/host_memory.py).
        ("dpokit + grad ckpt + malloc 1 MiB", me, "dpokit",
         {**common, "scale": {"gradient_checkpointing": True, "malloc_mmap_threshold": str(1 << 20)}}),
    ]


def timed_worker(python: str, kind: str, folder: Path | None, opts: dict) -> dict:
    """One worker process; its whole wall time (start to exit) added. A failure (out of memory,
    say) is a row saying so, not the end of the benchmark."""
    started = time.perf_counter()
    try:
        result = run_worker(python, kind, folder, opts)
    except RuntimeError as exc:
        return {"failed": str(exc).strip().splitlines()[-1][:300], "wall_s": time.perf_counter() - started}
    return {**result, "wall_s": time.perf_counter() - started}


def measure(title: str, folder: Path, info: dict, runs_spec: list, opts: dict, repeats: int, me: str) -> list[dict]:
    runs: dict[str, list[dict]] = {name: [] for name, *_ in runs_spec}
    gemms = []
    for _ in range(repeats):  # round robin: a busy spell on the machine hits every configuration alike
        gemms.append(run_worker(me, "gemm", None, opts)["gemm_flops"])
        for name, python, kind, extra in runs_spec:
            runs[name].append(timed_worker(python, kind, folder, {**opts, **extra}))
    gemm = statistics.median(gemms)
    rows = []
    for name, *_ in runs_spec:
        done = [r for r in runs[name] if "failed" not in r]
        if not done:
            rows.append({"name": name, "failed": runs[name][0]["failed"]})
            continue
        row = summarise(name, done, info, opts, gemm)
        row["wall_s"] = statistics.median(r["wall_s"] for r in done)
        rows.append(row)
    print_rows(title, rows, gemm)
    return rows


def print_rows(title: str, rows: list[dict], gemm: float) -> None:
    print(f"\n## {title}  (fp32 GEMM peak {gemm / 1e9:.1f} GFLOP/s)")
    print(f"{'configuration':32} {'pairs/s':>8} {'tokens/s':>9} {'peak RSS MB':>11} {'wall s':>7} "
          f"{'GEMM share':>10} {'x TRL pairs/s':>13} {'x TRL RSS':>9}  first losses")
    best = max((r for r in rows if r["name"].startswith("TRL") and "failed" not in r),
               key=lambda r: r["pairs_per_s"], default=None)
    frugal = min((r for r in rows if r["name"].startswith("TRL") and "failed" not in r),
                 key=lambda r: r["peak_rss_mb"], default=None)
    for r in rows:
        if "failed" in r:
            print(f"{r['name']:32} failed: {r['failed']}")
            continue
        ratios = (f"{r['pairs_per_s'] / best['pairs_per_s']:13.2f} {r['peak_rss_mb'] / frugal['peak_rss_mb']:9.2f}"
                  if best else f"{'':13} {'':9}")
        losses = ", ".join(f"{x:.4f}" for x in r["losses"][:2])
        print(f"{r['name']:32} {r['pairs_per_s']:8.3f} {r['tokens_per_s']:9.0f} {r['peak_rss_mb']:11.0f} "
              f"{r['wall_s']:7.0f} {r['mfu']:10.1%} {ratios}  {losses}")
    if best:
        print(f"(ratios against TRL's fastest configuration here, {best['name']}, for pairs/s, and its leanest, "
              f"{frugal['name']}, for RSS)")


# ----------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="4 pairs, batch 2, max length 128 (memory: 256, 512), 1 warm-up + 1 timed step")
    parser.add_argument("--sections", default="table", help="comma list of table, memory")
    parser.add_argument("--lengths", default="768,2048", help="with table: max lengths")
    parser.add_argument("--memory-lengths", default=",".join(map(str, MEMORY_LENGTHS)), help="with memory")
    parser.add_argument("--pairs", type=int, default=48,
                        help="rows per run (the issue's 48); at least batch x (warmup + steps): one epoch")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=11, help="timed optimizer steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="runs per configuration (medians reported)")
    parser.add_argument("--shared", default=str(SHARED), help="the shared preference samples' folder")
    parser.add_argument("--trl-python", help="python with trl 1.16 (default: this one if it imports trl)")
    parser.add_argument("--only", help="comma list of configuration names to run (default: all)")
    parser.add_argument("--json", help="also write every figure to this file")
    parser.add_argument("--plot", help="with memory: write the memory-vs-length plot here")
    args = parser.parse_args()

    if args.smoke:
        args.pairs, args.batch, args.lengths, args.steps, args.warmup = 4, 2, "128", 1, 1
        args.memory_lengths = "256,512"
    shared = Path(args.shared)
    if not (shared / ROWS_FILE).is_file():
        raise SystemExit(f"{shared / ROWS_FILE} not found: pass --shared FOLDER (../shared/data/preferences)")
    if args.pairs < args.batch * (args.warmup + args.steps):
        raise SystemExit("--pairs must cover --batch x (--warmup + --steps): the timed steps are one epoch's")
    me = sys.executable
    trl = args.trl_python or (me if _imports_trl(me) else None)
    if trl is None:
        print("no python with trl found (--trl-python): TRL rows skipped")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = real_model_folder()
    from dpokit.model.load import load_tokenizer

    tokenizer = load_tokenizer(str(model))
    scratch = Path(tempfile.mkdtemp(prefix="dpokit-real-bench-"))
    opts = {"threads": args.threads, "steps": args.steps, "warmup": args.warmup, "smoke": args.smoke,
            "device": "cpu", "dtype": "fp32", "batch": args.batch, "scratch": str(scratch / "runs")}
    report: dict = {"model": str(model), "rows_file": str(shared / ROWS_FILE), "settings": vars(args), "sections": {}}
    print(f"machine: {os.cpu_count()} CPUs, {args.threads} threads; model {model}")
    for section in args.sections.split(","):
        if section == "table":
            for max_length in map(int, args.lengths.split(",")):
                rows, lengths = usable_rows(shared, tokenizer, max_length, args.pairs)
                info = prepare(scratch / f"table{max_length}", model, rows, lengths)
                title = (f"max length {max_length}: {args.pairs} pairs, batch {args.batch}, {args.steps} timed steps "
                         f"after {args.warmup}; longest sequence {max(p + max(c, r) for p, c, r in lengths)} tokens")
                report["sections"][f"table{max_length}"] = measure(
                    title, scratch / f"table{max_length}", info, [c for c in configs(me, trl, max_length) if c[1] and (not args.only or c[0] in args.only.split(","))],
                    opts, args.repeats, me)
                _write(args.json, report)
        elif section == "memory":
            report["memory"] = memory_section(args, shared, tokenizer, model, scratch, opts, me, trl)
            _write(args.json, report)
        else:
            raise SystemExit(f"unknown section {section!r} (table, memory)")


def memory_section(args, shared: Path, tokenizer, model: Path, scratch: Path, opts: dict, me: str, trl: str | None) -> dict:
    rows_by_length = {}
    for length in map(int, args.memory_lengths.split(",")):
        rows, lengths = long_rows(shared, tokenizer, length, 4)
        folder = scratch / f"memory{length}"
        info = prepare(folder, model, rows, lengths)
        spec = [c for c in configs(me, trl, length + 64) if "ckpt" in c[0] and c[1]]
        rows_by_length[length] = measure(f"memory: sequences of about {length} tokens", folder, info, spec,
                                         {**opts, "batch": 2, "steps": 1, "warmup": 1}, 1, me)
    usable = {n: rows for n, rows in rows_by_length.items() if all("failed" not in r for r in rows)}
    return summarise_lengths(usable, Path(args.plot) if args.plot else None) if usable else {}


def _imports_trl(python: str) -> bool:
    import subprocess

    return subprocess.run([python, "-c", "import trl"], capture_output=True).returncode == 0


def _write(path: str | None, report: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
