"""dpokit and TRL's DPOTrainer side by side: same model, same data, same order, same threads.

    .venv/bin/python benchmarks/bench_vs_trl.py --trl-python /tmp/trlenv/bin/python
    .venv/bin/python benchmarks/bench_vs_trl.py --smoke          # seconds; what CI runs

TRL lives in its own virtual environment (never a dependency of dpokit); each configuration runs
in its own subprocess (`--worker`) with that environment's python, one after the other, so peak
RSS is per configuration and the two cores are not shared. Every worker gets a model folder
(random-initialised Llama from a config), a word-level tokenizer (one token per word, so both
tools see identical token ids) and a JSON Lines file of pairs whose texts already end with EOS;
the pairs are visited in dpokit's epoch order (TRL: that order, sequential sampler).

Printed per configuration: timed optimizer steps' pairs/s and tokens/s (tokens = 2 x prompt +
chosen + rejected per pair, whatever the layout computes), peak RSS, seconds before the first
step (loading, tokenizing, reference precompute), the first losses, and model FLOP/s against a
fp32 GEMM measured here. Model FLOPs are those of the plain padding-free computation: 6 x
body parameters per token, 6 x LM-head parameters per response token, causal attention; the
reference forward is not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_length import BATCH, LENGTHS, STEPS, WARMUP, length_configs, length_spec, summarise_lengths

HERE = Path(__file__).resolve()
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>"]
MAIN = {"vocab": 8192, "hidden": 256, "inter": 688, "layers": 4, "heads": 4, "pairs": 512,
        "prompt": (48, 96), "response": (32, 128)}
LONG = {**MAIN, "prompt": (256, 512), "response": (16, 64), "pairs": 256}
# A Qwen2-0.5B-shaped model (random weights) for CUDA machines: benchmarks/gpu_check.sh.
GPU = {"arch": "qwen2", "vocab": 151936, "hidden": 896, "inter": 4864, "layers": 24, "heads": 14, "kv_heads": 2,
       "tied": True, "pairs": 512, "prompt": (48, 96), "response": (32, 128)}
SMOKE = {"vocab": 512, "hidden": 32, "inter": 64, "layers": 1, "heads": 2, "pairs": 24,
         "prompt": (4, 10), "response": (2, 8)}


# ----------------------------------------------------------------------------- set-up
def prepare(folder: Path, spec: dict, seed: int = 0) -> dict:
    """Model folder, tokenizer, pairs file and visiting order; returns token statistics."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {tok: i for i, tok in enumerate(SPECIAL)}
    vocab.update({f"w{i}": i for i in range(len(SPECIAL), spec["vocab"])})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    tok.save_pretrained(folder / "model")
    config_class = Qwen2Config if spec.get("arch") == "qwen2" else LlamaConfig
    config = config_class(vocab_size=spec["vocab"], hidden_size=spec["hidden"], intermediate_size=spec["inter"],
                          num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"],
                          num_key_value_heads=spec.get("kv_heads", spec["heads"]),
                          max_position_embeddings=spec.get("positions", 2048),
                          tie_word_embeddings=spec.get("tied", False), bos_token_id=2, eos_token_id=3, pad_token_id=0)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder / "model")

    rng = random.Random(seed)
    words = lambda n: " ".join(f"w{rng.randrange(len(SPECIAL), min(spec['vocab'], 8192))}" for _ in range(n))  # noqa: E731
    rows, lengths = [], []
    for _ in range(spec["pairs"]):
        p = rng.randint(*spec["prompt"])
        c = rng.randint(*spec["response"])
        r = rng.randint(*spec["response"])
        while r == c:  # chosen and rejected of different lengths
            r = rng.randint(*spec["response"])
        # EOS written into the text: TRL then adds none, dpokit keeps exactly one.
        rows.append({"prompt": words(p), "chosen": " " + words(c - 1) + " </s>", "rejected": " " + words(r - 1) + " </s>"})
        lengths.append((p + 1, c, r))  # + BOS
    (folder / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    order = dpokit_order(len(rows))
    (folder / "order.json").write_text(json.dumps(order))
    info = {"lengths": lengths, "order": order, "config": config.to_dict()}
    (folder / "info.json").write_text(json.dumps(info))
    return info


def dpokit_order(num_pairs: int) -> list[int]:
    """The order dpokit visits the pairs in its first epoch (seed 0), which TRL then follows."""
    from dpokit.data.order import epoch_order

    return epoch_order(num_pairs, seed=0, epoch=0)


def model_flops_per_pair(info: dict, prompt: int, chosen: int, rejected: int) -> float:
    c = info["config"]
    h, inter, layers, vocab = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    kv = c["num_key_value_heads"] * h // c["num_attention_heads"]
    body = layers * (2 * h * h + 2 * h * kv + 3 * h * inter)
    flops = 0.0
    for response in (chosen, rejected):
        n = prompt + response
        flops += 6 * body * n + 6 * vocab * h * response + 6 * layers * 2 * h * n * n / 2
    return flops


# ----------------------------------------------------------------------------- workers
def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _vm_peak_mb() -> float:
    """Peak virtual address space (what RLIMIT_AS caps), from /proc; 0 where there is none."""
    status = Path("/proc/self/status")
    lines = status.read_text().splitlines() if status.exists() else []
    return next((int(line.split()[1]) / 1024 for line in lines if line.startswith("VmPeak:")), 0.0)


def _gpu_mb() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0


def worker_dpokit(folder: Path, opts: dict) -> dict:
    import torch

    torch.set_num_threads(opts["threads"])
    from dpokit.config import build_config
    from dpokit.train.loop import train

    stamps, cpu, said = [], [], []  # said: (time, line) of every log line

    def log(line: str) -> None:
        said.append((time.perf_counter(), line))
        if line.startswith("step "):
            stamps.append(time.perf_counter())
            cpu.append(time.process_time())

    steps = opts["warmup"] + opts["steps"]
    micro = opts.get("micro_batch", opts.get("batch", 8))
    cfg = build_config({
        "model": {"model": str(folder / "model"), "dtype": opts.get("dtype", "fp32"),
                  "device": opts.get("device", "cpu")},
        "data": {"data": str(folder / "pairs.jsonl"), "max_length": opts.get("max_length", 2048)},
        "loss": {"beta": 0.1},
        "train": {"output": str(Path(opts["scratch"]) / "dpokit"), "overwrite": True, "batch_size": micro,
                  "gradient_accumulation_steps": opts.get("batch", 8) // micro, "max_steps": steps, "learning_rate": 5e-6, "lr_scheduler": "constant", "log_every": 1,
                  "progress": "off", "seed": 0, "max_grad_norm": 1.0},
        "speed": opts.get("speed", {}), "scale": opts.get("scale", {}),
    })
    started = time.perf_counter()
    result = train(cfg, log=log)
    losses = [r["loss"] for r in result.history if "loss" in r]
    return {"timed_s": stamps[-1] - stamps[opts["warmup"] - 1], "before_first_step_s": stamps[0] - started,
            "timed_cpu_s": cpu[-1] - cpu[opts["warmup"] - 1], "step_stamps": stamps, "said": said,
            "losses": losses, "peak_rss_mb": _rss_mb(), "peak_vm_mb": _vm_peak_mb(), "peak_gpu_mb": _gpu_mb(),
            **_layout_check_seconds(result.output),
            "notes": [line for _, line in said if line.startswith("reference")]}


def _layout_check_seconds(output: Path) -> dict:
    record = json.loads((output / "layout_check.json").read_text())
    return {"layout_check_s": record.get("seconds", 0.0), "layout_check_cpu_s": record.get("cpu_seconds", 0.0)}


def worker_trl(folder: Path, opts: dict) -> dict:
    import torch

    torch.set_num_threads(opts["threads"])
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    started = time.perf_counter()
    rows = [json.loads(line) for line in (folder / "pairs.jsonl").read_text().splitlines()]
    order = json.loads((folder / "order.json").read_text())
    dataset = Dataset.from_list([rows[i] for i in order])
    stamps, cpu = [], []

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())
            cpu.append(time.process_time())

    cuda = opts.get("device", "cpu") == "cuda"
    micro = opts.get("micro_batch", opts.get("batch", 8))
    model = AutoModelForCausalLM.from_pretrained(folder / "model", dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder / "model")
    args = DPOConfig(
        output_dir=str(Path(opts["scratch"]) / "trl"), per_device_train_batch_size=micro,
        gradient_accumulation_steps=opts.get("batch", 8) // micro,
        max_steps=opts["warmup"] + opts["steps"], learning_rate=5e-6, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, beta=0.1, logging_steps=1, save_strategy="no",
        report_to=[], bf16=opts.get("dtype") == "bf16", fp16=False, use_cpu=not cuda, max_length=opts.get("max_length", 2048), seed=0, data_seed=0,
        dataloader_num_workers=0, disable_tqdm=True, train_sampling_strategy="sequential",
        precompute_ref_log_probs=opts.get("precompute", False),
        **({"gradient_checkpointing": True} if opts.get("gradient_checkpointing") else {}),
    )
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok, callbacks=[Timer()])
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return {"timed_s": stamps[-1] - stamps[opts["warmup"] - 1], "before_first_step_s": stamps[0] - started,
            "timed_cpu_s": cpu[-1] - cpu[opts["warmup"] - 1],
            "losses": losses, "peak_rss_mb": _rss_mb(), "peak_vm_mb": _vm_peak_mb(), "peak_gpu_mb": _gpu_mb(), "notes": []}


def worker_gemm(opts: dict) -> dict:
    import torch

    torch.set_num_threads(opts["threads"])
    cuda = opts.get("device", "cpu") == "cuda"
    n = 256 if opts.get("smoke") else 8192 if cuda else 2048
    dtype = torch.bfloat16 if opts.get("dtype") == "bf16" else torch.float32
    a = torch.randn(n, n, dtype=dtype, device="cuda" if cuda else "cpu")
    rates = []
    for _ in range(7):
        t = time.perf_counter()
        a @ a
        if cuda:
            torch.cuda.synchronize()
        rates.append(2 * n**3 / (time.perf_counter() - t))
    return {"gemm_flops": statistics.median(rates[2:])}


# ----------------------------------------------------------------------------- driver
def run_worker(python: str, kind: str, folder: Path | None, opts: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(opts["threads"]), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
           "PYTHONWARNINGS": "ignore", **opts.get("env", {})}
    cmd = [python, str(HERE), "--worker", kind, "--folder", str(folder or ""), "--opts", json.dumps(opts)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not result:
        raise RuntimeError(f"{kind} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(result[-1][len("RESULT "):])


def summarise(name: str, runs: list[dict], info: dict, opts: dict, gemm: float) -> dict:
    batch = opts.get("batch", 8)
    timed = [info["order"][i] for i in range(opts["warmup"] * batch, (opts["warmup"] + opts["steps"]) * batch)]
    timed = [i for i in timed if i < len(info["lengths"])]
    tokens = sum(2 * p + c + r for p, c, r in (info["lengths"][i] for i in timed))
    flops = sum(model_flops_per_pair(info, *info["lengths"][i]) for i in timed)
    seconds = statistics.median(run["timed_s"] for run in runs)
    cpu_seconds = statistics.median(run["timed_cpu_s"] for run in runs)
    return {"name": name, "pairs_per_s": len(timed) / seconds, "tokens_per_s": tokens / seconds,
            "pairs_per_cpu_s": len(timed) / cpu_seconds,
            "peak_rss_mb": statistics.median(run["peak_rss_mb"] for run in runs),
            "peak_gpu_mb": statistics.median(run.get("peak_gpu_mb", 0.0) for run in runs),
            "before_first_step_s": statistics.median(run["before_first_step_s"] for run in runs),
            "mfu": flops / seconds / gemm, "runs": len(runs), "timed_s_all": [round(r["timed_s"], 2) for r in runs],
            "losses": runs[0]["losses"], "notes": runs[0]["notes"], **_layout_check_cost(runs, seconds / opts["steps"], cpu_seconds / opts["steps"])}


def _layout_check_cost(runs: list[dict], step_s: float, step_cpu_s: float) -> dict:
    """dpokit's first-batch layout check: seconds, and as a fraction of 100 steps (wall and CPU time)."""
    if "layout_check_s" not in runs[0]:
        return {}
    check_s = statistics.median(run["layout_check_s"] for run in runs)
    check_cpu_s = statistics.median(run["layout_check_cpu_s"] for run in runs)
    return {"layout_check_s": check_s, "layout_check_of_100_steps": check_s / (100 * step_s),
            "layout_check_cpu_of_100_steps": check_cpu_s / (100 * step_cpu_s)}


def print_table(title: str, rows: list[dict], baseline: str | None) -> None:
    print(f"\n## {title}")
    base = next((r for r in rows if r["name"] == baseline), None)
    gpu = any(r["peak_gpu_mb"] for r in rows)
    print(f"{'configuration':36} {'pairs/s':>8} {'tokens/s':>9} {'peak RSS MB':>11} "
          + (f"{'peak GPU MB':>11} " if gpu else "")
          + f"{'setup s':>8} {'pairs/CPU-s':>11} {'model FLOP/s / GEMM':>20} {'x pairs/s':>9} {'x mem':>6}"
          + f" {'x pairs/CPU-s':>13}  first losses")
    for r in rows:
        mem = "peak_gpu_mb" if gpu else "peak_rss_mb"
        ratio = f"{r['pairs_per_s'] / base['pairs_per_s']:9.2f} {r[mem] / base[mem]:6.2f} " \
            f"{r['pairs_per_cpu_s'] / base['pairs_per_cpu_s']:13.2f}" if base else f"{'':9} {'':6} {'':13}"
        losses = ", ".join(f"{x:.4f}" for x in r["losses"][:3])
        print(f"{r['name']:36} {r['pairs_per_s']:8.2f} {r['tokens_per_s']:9.0f} {r['peak_rss_mb']:11.0f} "
              + (f"{r['peak_gpu_mb']:11.0f} " if gpu else "")
              + f"{r['before_first_step_s']:8.1f} {r['pairs_per_cpu_s']:11.2f} {r['mfu']:20.1%} {ratio}  {losses}")
    if base:
        print(f"(ratios against: {baseline})")
    for r in rows:
        if "layout_check_s" in r:
            print(f"{r['name']}: first-batch layout check {r['layout_check_s']:.3f} s = "
                  f"{r['layout_check_of_100_steps']:.3%} of 100 timed steps "
                  f"({r['layout_check_cpu_of_100_steps']:.3%} in CPU time)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model and data, dpokit (and TRL if given) only")
    parser.add_argument("--trl-python", default="/tmp/trlenv/bin/python", help="python of the TRL environment")
    parser.add_argument("--sections", default="main,long,vocab", help="comma list of main, layouts, long, vocab, length, gpu")
    parser.add_argument("--repeats", type=int, default=1, help="runs per configuration (medians reported)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--json", help="also write all figures to this file")
    parser.add_argument("--plot", help="with --sections length: write the memory-vs-length plot here")
    parser.add_argument("--vocabs", default="8192,32768,131072", help="with --sections vocab: vocabulary sizes")
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)), help="with --sections length: tokens per sequence")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--opts", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        opts = json.loads(args.opts)
        fn = {"dpokit": worker_dpokit, "trl": worker_trl}.get(args.worker)
        out = worker_gemm(opts) if args.worker == "gemm" else fn(Path(args.folder), opts)
        print("RESULT " + json.dumps(out), flush=True)
        return

    trl_python = args.trl_python if Path(args.trl_python).exists() else None
    if trl_python is None:
        print(f"TRL environment {args.trl_python} not found: TRL columns skipped "
              "(python3 -m venv /tmp/trlenv && /tmp/trlenv/bin/pip install torch==2.13.0 trl==1.16.0)")
    me = sys.executable
    base_opts = {"threads": args.threads, "steps": args.steps, "warmup": args.warmup, "smoke": args.smoke,
                 "device": args.device, "dtype": args.dtype}
    if args.smoke:
        base_opts.update(steps=2, warmup=1)
    scratch = Path(tempfile.mkdtemp(prefix="dpokit-bench-"))
    gemms = [run_worker(me, "gemm", None, base_opts)["gemm_flops"]]
    gemm = gemms[0]
    print(f"machine: {os.cpu_count()} CPUs, {args.threads} threads, {args.device}; {args.dtype} GEMM: "
          f"{gemm / 1e9:.1f} GFLOP/s")
    report: dict = {"gemm_flops": gemm, "sections": {}}

    def measure(spec_name, spec, configs, baseline, steps=None, warmup=None, batch=8):
        folder = scratch / spec_name
        info = prepare(folder, spec)
        opts = {**base_opts, "scratch": str(scratch / "runs"), "batch": batch}
        if steps:
            opts.update(steps=steps, warmup=warmup)
        configs = [c for c in configs if c[1] is not None]
        runs: dict[str, list[dict]] = {name: [] for name, *_ in configs}
        # Round robin, so a busy spell on a shared machine hits every configuration alike.
        for _ in range(args.repeats):
            gemms.append(run_worker(me, "gemm", None, base_opts)["gemm_flops"])
            for name, python, kind, extra in configs:
                runs[name].append(run_worker(python, kind, folder, {**opts, **extra}))
        gemm_now = statistics.median(gemms)
        rows = [summarise(name, runs[name], info, opts, gemm_now) for name, *_ in configs]
        print_table(f"{spec_name}: {spec}", rows, baseline)
        report["sections"][spec_name] = rows
        return rows

    trl = trl_python
    if args.smoke:
        measure("smoke", SMOKE, [("dpokit (defaults)", me, "dpokit", {}),
                                 ("TRL precompute_ref_log_probs", trl, "trl", {"precompute": True})],
                "TRL precompute_ref_log_probs" if trl else None)
    sections = [] if args.smoke else args.sections.split(",")
    if "main" in sections:
        measure("main", MAIN, [
            ("TRL default", trl, "trl", {}),
            ("TRL precompute_ref_log_probs", trl, "trl", {"precompute": True}),
            ("dpokit defaults", me, "dpokit", {}),
            ("dpokit padded, plain head, live ref", me, "dpokit",
             {"speed": {"layout": "padded", "lm_head": "plain", "reference": "live"}}),
        ], "TRL precompute_ref_log_probs" if trl else None)
    if "gpu" in sections:
        measure("gpu", GPU, [
            ("TRL default", trl, "trl", {}),
            ("TRL precompute_ref_log_probs", trl, "trl", {"precompute": True}),
            ("dpokit defaults", me, "dpokit", {}),
            ("dpokit packed", me, "dpokit", {"speed": {"layout": "packed"}}),
            ("dpokit padded, plain head, live ref", me, "dpokit",
             {"speed": {"layout": "padded", "lm_head": "plain", "reference": "live"}}),
        ], "TRL precompute_ref_log_probs" if trl else None)
    if "layouts" in sections:
        measure("layouts", MAIN, [
            ("dpokit padded", me, "dpokit", {"speed": {"layout": "padded"}}),
            ("dpokit packed", me, "dpokit", {"speed": {"layout": "packed"}}),
            ("dpokit prefix-shared", me, "dpokit", {"speed": {"layout": "prefix-shared"}}),
        ], "dpokit padded")
    if "long" in sections:
        measure("long", LONG, [
            ("dpokit padded", me, "dpokit", {"speed": {"layout": "padded"}}),
            ("dpokit packed", me, "dpokit", {"speed": {"layout": "packed"}}),
            ("dpokit prefix-shared", me, "dpokit", {"speed": {"layout": "prefix-shared"}}),
            ("dpokit defaults", me, "dpokit", {}),
        ], "dpokit padded")
    if "vocab" in sections:
        for vocab in map(int, args.vocabs.split(",")):
            spec = {**MAIN, "vocab": vocab, "pairs": 32}
            measure(f"vocab{vocab // 1024}k", spec, [
                ("dpokit defaults (chunked head)", me, "dpokit", {}),
                ("dpokit plain head", me, "dpokit", {"speed": {"lm_head": "plain"}}),
            ] + ([("TRL precompute_ref_log_probs", trl, "trl", {"precompute": True})] if vocab == 131072 else []),
                None, steps=2, warmup=1)
    if "length" in sections:
        rows_by_length = {}
        for length in map(int, args.lengths.split(",")):
            rows_by_length[length] = measure(f"length{length // 1024}k", length_spec(MAIN, length),
                                             length_configs(me, trl, length), None, steps=STEPS, warmup=WARMUP,
                                             batch=BATCH)
            # After every length, so a run stopped early keeps the figures of the lengths it finished.
            report["length"] = summarise_lengths(rows_by_length, Path(args.plot) if args.plot else None)
            if args.json:
                Path(args.json).write_text(json.dumps(report, indent=1))
    report["gemm_flops"] = statistics.median(gemms)
    print(f"\nfp32 GEMM, median of {len(gemms)} measurements: {report['gemm_flops'] / 1e9:.1f} GFLOP/s")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
