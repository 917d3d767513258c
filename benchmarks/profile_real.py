"""Where one DPO training step of the real model (SmolLM2-135M-Instruct, fp32, CPU) spends its time
and memory, and what each speed lever moves.

    .venv/bin/python benchmarks/profile_real.py --threads 1            # all variants, one process each
    .venv/bin/python benchmarks/profile_real.py --smoke                 # 2 pairs at 128 tokens, 2 variants

Each variant runs in its own process (so peak RSS is its own): the first `--pairs` usable rows of
bench_real.py at `--max-length`, one batch, the step training runs, built from dpokit's pieces:
reference log-probs (no gradient, the same layout), the policy's forward (`sequence_logps`), the
sigmoid DPO loss (β 0.1), backward, gradient clipping and an AdamW step; step 1 warms up, step 2 is
timed by phase (wall and CPU seconds). One variant (PROFILED: the layout, head and attention
dpokit's defaults pick for this model) runs a step 3 under torch.profiler (self CPU time by op
class: GEMMs split by the weight they multiply, attention core, softmax/log-sum-exp, elementwise,
copies and indexing) and with hooks on each decoder layer (forward and backward time by layer).

What the loss sees: each variant's step-1 policy log-probs against the padded forward with the
plain LM head (fp32): the largest gap over the batch's sequences, and the gap in the step-1 loss
computed from them with the same reference, which the issue bounds at 1e-5.

Shares are meaningful with 1 thread on a shared machine; absolute seconds are not (run on an idle one).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_real import SHARED, usable_rows  # noqa: E402
from real_model import real_model_folder  # noqa: E402

# key -> (layout, LM head chunked?, attention, recompute: False, True (gradient checkpointing) or "selective")
VARIANTS = {
    "baseline": ("padded", False, "sdpa", False),  # the padded math path, plain LM head
    "padded-chunked": ("padded", True, "sdpa", False),
    "packed-segments": ("packed", True, "segments", False),
    "packed-masks": ("packed", True, "sdpa", False),
    "prefix-segments": ("prefix-shared", True, "segments", False),
    "prefix-masks": ("prefix-shared", True, "sdpa", False),
    "padded-chunked-eager": ("padded", True, "eager", False),
    "prefix-segments-ckpt": ("prefix-shared", True, "segments", True),
    "prefix-segments-selective": ("prefix-shared", True, "segments", "selective"),
    "baseline-ckpt": ("padded", False, "sdpa", True),
}
BASELINE = "baseline"
PROFILED = "prefix-segments"


# ----------------------------------------------------------------------------- one variant (worker)
def run_variant(name: str, args) -> dict:
    import torch

    from dpokit.data.batching import collate
    from dpokit.data.pairs import PreferencePair
    from dpokit.data.tokenize import PairTokenizer
    from dpokit.model.load import load_policy, load_tokenizer

    torch.set_num_threads(args.threads)
    if args.live_memory:
        from dpokit.model.host_memory import fix_mmap_threshold

        fix_mmap_threshold(1 << 20)
    layout, chunked, attention, ckpt = VARIANTS[name]
    folder = real_model_folder()
    tokenizer = load_tokenizer(str(folder))
    rows, _ = usable_rows(Path(args.shared), tokenizer, args.max_length, args.pairs)
    pairs = [PreferencePair(r["prompt"], r["chosen"], r["rejected"], i) for i, r in enumerate(rows)]
    tokenized, _ = PairTokenizer(tokenizer, max_length=args.max_length).tokenize(pairs)
    policy = _policy(load_policy(str(folder), torch.device("cpu")), attention, ckpt)
    batch = collate(tokenized, tokenizer.pad_token_id, layout, 0)
    plain_batch = collate(tokenized, tokenizer.pad_token_id, "padded", 0)
    result = {"name": name, "tokens_in_batch": int(batch.input_ids.numel()),
              "real_tokens": sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in tokenized)}
    reference, result["reference_pass_s"], result["reference_pass_cpu_s"] = _timed_no_grad(policy, batch, chunked)
    result["what_the_loss_sees"] = _loss_gap(policy, reference, plain_batch)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    for step in (1, 2, 3):  # 1 warms up, 2 is timed, 3 (the profiled variant only) runs under the profiler
        profiled = step == 3
        if profiled and (name != PROFILED or args.no_profile):
            break
        phases, breakdown = _step(policy, optimizer, batch, reference, chunked, profiled)
        result[f"step{step}"] = phases
        if breakdown:
            result["profile"] = breakdown
        if step == 2:  # the profiler's records would add to it
            result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # Last: its extra forward would raise the peak above what the step itself needs.
    result["saved_for_backward_mb"] = saved_for_backward(policy, batch, chunked)
    return result


def _policy(model, attention: str, ckpt: bool | str):
    from dpokit.model.attention import choose_attention

    if attention == "segments":
        choose_attention(model, "segments", log=lambda line: None, mask_cells=0)
    elif attention == "eager":
        model.set_attn_implementation("eager")
    if ckpt:  # as a run sets it up (model/load.py)
        from dpokit.config import LoraSection
        from dpokit.model.load import prepare_policy

        prepare_policy(model, LoraSection(), ckpt is True, selective_recompute=ckpt == "selective")
    return model.train()


def _timed_no_grad(model, batch, chunked: bool):
    import torch

    from dpokit.model.logprobs import sequence_logps

    wall, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        out = sequence_logps(model, batch, chunked_head=chunked)
    return out, time.perf_counter() - wall, time.process_time() - cpu


def _loss(policy_out, reference):
    from dpokit.losses import preference_loss

    return preference_loss("sigmoid", policy_chosen_logps=policy_out.chosen_logps,
                           policy_rejected_logps=policy_out.rejected_logps,
                           reference_chosen_logps=reference.chosen_logps,
                           reference_rejected_logps=reference.rejected_logps, beta=0.1).losses.mean()


def _loss_gap(policy, reference, plain_batch) -> dict:
    """This variant's log-probs (the reference pass, same weights) against padded + plain head."""
    import torch

    plain, _, _ = _timed_no_grad(policy, plain_batch, False)
    gap = torch.cat([(reference.chosen_logps - plain.chosen_logps), (reference.rejected_logps - plain.rejected_logps)])
    # Same policy, reference from the baseline math: the loss this variant's log-probs give minus ln 2.
    loss_gap = (_loss(reference, plain) - _loss(plain, plain)).abs().item()
    return {"max_logp_gap": gap.abs().max().item(), "loss_gap": loss_gap,
            "largest_sum": torch.cat([plain.chosen_logps, plain.rejected_logps]).abs().max().item()}


def _step(policy, optimizer, batch, reference, chunked: bool, profiled: bool):
    import torch

    from dpokit.model.logprobs import sequence_logps

    phases, clock = {}, _Clock()
    timers = _LayerTimers(policy) if profiled else None
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) \
        if profiled else None
    if profiler:
        profiler.__enter__()
    out = sequence_logps(policy, batch, chunked_head=chunked)
    phases["forward"] = clock.lap()
    loss = _loss(out, reference)
    phases["loss"] = clock.lap()
    loss.backward()
    phases["backward"] = clock.lap()
    if profiler:
        profiler.__exit__(None, None, None)
    torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    phases["clip + AdamW"] = clock.lap()
    phases["loss_value"] = loss.item()
    breakdown = None
    if profiled:
        timers.remove()
        breakdown = {"by_op_class": op_classes(profiler), "by_layer": timers.summary()}
    return phases, breakdown


class _Clock:
    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def lap(self) -> dict:
        wall, cpu = time.perf_counter(), time.process_time()
        lap = {"wall_s": wall - self.wall, "cpu_s": cpu - self.cpu}
        self.wall, self.cpu = wall, cpu
        return lap


class _LayerTimers:
    """Forward and backward seconds of each decoder layer (hooks), and of the whole body."""

    def __init__(self, model):
        from dpokit.model.logprobs import model_body

        self.body = model_body(model)
        self.layers = list(self.body.layers)
        self.times: dict[str, float] = {}
        self.starts: dict[str, float] = {}
        self.handles = []
        for i, layer in enumerate(self.layers):
            self._hook(layer, f"layer{i}")
        self._hook(self.body.embed_tokens, "embedding", backward=False)
        self._hook(self.body, "body", backward=False)

    def _hook(self, module, key: str, backward: bool = True) -> None:
        def start(tag):
            return lambda *_: self.starts.__setitem__(tag, time.perf_counter())

        def stop(tag):
            return lambda *_: self.times.__setitem__(tag, self.times.get(tag, 0.0) + time.perf_counter()
                                                     - self.starts.pop(tag, time.perf_counter()))

        self.handles += [module.register_forward_pre_hook(start(f"{key}.forward")),
                         module.register_forward_hook(stop(f"{key}.forward"))]
        if backward:
            self.handles += [module.register_full_backward_pre_hook(start(f"{key}.backward")),
                             module.register_full_backward_hook(stop(f"{key}.backward"))]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def summary(self) -> dict:
        per_layer = {kind: [self.times.get(f"layer{i}.{kind}", 0.0) for i in range(len(self.layers))]
                     for kind in ("forward", "backward")}
        return {"layers": len(self.layers), "embedding_forward_s": self.times.get("embedding.forward", 0.0),
                "body_forward_s": self.times.get("body.forward", 0.0),
                **{f"decoder_layers_{k}_s": sum(v) for k, v in per_layer.items()},
                **{f"decoder_layer_{k}_min_max_s": (min(v), max(v)) for k, v in per_layer.items()}}


def saved_for_backward(model, batch, chunked: bool) -> dict[str, float]:
    """MB the forward keeps for backward, by the module that saved it (each storage counted once,
    where it was first saved; the weights, which Linear layers save too, not counted): what
    activation memory is made of. Under gradient checkpointing
    the checkpoint keeps its tensors through its own hooks, which these do not see: read peak RSS.
    Anything saved outside the model's modules is the chunked LM head's and the loss's."""
    import torch

    from dpokit.model.logprobs import sequence_logps

    stack: list[str] = ["LM head and loss (outside the body)"]
    seen = {p.untyped_storage().data_ptr() for p in model.parameters()}  # weights are not activations
    totals: dict[str, float] = {}
    handles = []
    for name, module in model.named_modules():
        if name:  # every module pushes what it is while it runs; the innermost one gets the bytes
            where = _component(name)
            handles.append(module.register_forward_pre_hook(lambda *_, w=where: stack.append(w)))
            handles.append(module.register_forward_hook(lambda *_: stack.pop() and None))  # None: output kept

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen and tensor.device.type == "cpu":
            seen.add(storage.data_ptr())
            totals[stack[-1]] = totals.get(stack[-1], 0.0) + storage.nbytes() / 2**20
        return tensor

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            sequence_logps(model, batch, chunked_head=chunked)
    finally:
        for handle in handles:
            handle.remove()
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


def _component(name: str) -> str:
    leaf = name.rsplit(".", 1)[-1]
    if leaf in ("mlp", "gate_proj", "up_proj", "down_proj", "act_fn"):
        return "MLP (gate, up, SiLU, product, down)"
    if leaf in ("q_proj", "k_proj", "v_proj", "o_proj"):
        return "attention projections' inputs"
    if leaf == "self_attn":
        return "attention core (rotary, sdpa)"
    if "norm" in leaf:
        return "RMSNorms"
    if "embed" in leaf:
        return "embedding"
    return "decoder layers' and body's own ops"


def op_classes(profiler) -> dict[str, float]:
    """Self CPU seconds by op class; GEMMs named by the weight they multiply (read off the shapes:
    576x576 q/o, 576x192 k/v, 576x1536 gate/up/down, 49152 the LM head)."""
    totals: dict[str, float] = {}
    for event in profiler.key_averages(group_by_input_shape=True):
        kind = _op_class(event.key, event.input_shapes)
        totals[kind] = totals.get(kind, 0.0) + event.self_cpu_time_total / 1e6
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


def _op_class(name: str, shapes) -> str:
    dims = {d for shape in shapes or [] for d in (shape or [])}
    if name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::baddbmm"):
        if 49152 in dims:
            return "GEMM: LM head"
        if 1536 in dims:
            return "GEMM: MLP (gate, up, down)"
        if 192 in dims:
            return "GEMM: k, v projections"
        if 576 in dims:
            return "GEMM: q, o projections"
        return "attention core (eager matmuls)"
    if "attention" in name or "sdpa" in name or "flash" in name:
        return "attention core (sdpa)"
    if any(word in name for word in ("softmax", "logsumexp", "log_softmax", "exp")):
        return "softmax / log-sum-exp"
    if any(word in name for word in ("copy", "cat", "index", "gather", "scatter", "clone", "contiguous", "to",
                                     "fill", "zero", "empty", "slice", "select", "view", "reshape", "expand")):
        return "copies, indexing, allocation"
    return "elementwise (norms, SiLU, rotary, residuals) and other"


# ----------------------------------------------------------------------------- driver
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-length", type=int, default=768)
    parser.add_argument("--pairs", type=int, default=4, help="pairs in the step's batch")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", default="all", help=f"comma list of {', '.join(VARIANTS)}, or all")
    parser.add_argument("--shared", default=str(SHARED), help="the shared preference samples' folder")
    parser.add_argument("--smoke", action="store_true", help="2 pairs at 128 tokens; the baseline and auto variants")
    parser.add_argument("--no-profile", action="store_true", help="skip torch.profiler and the layer hooks")
    parser.add_argument("--live-memory", action="store_true",
                        help="fix malloc's mmap threshold at 1 MiB in each variant (model/host_memory.py), so its "
                        "peak RSS follows the tensors alive rather than the heap's retained fragments")
    parser.add_argument("--json", help="write every figure to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(run_variant(args.worker, args)), flush=True)
        return
    if args.smoke:
        args.max_length, args.pairs, args.variants = 128, 2, f"{BASELINE},{PROFILED}"
    names = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    results = []
    for name in names:
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false",
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
        cmd = [sys.executable, __file__, "--worker", name, "--max-length", str(args.max_length), "--pairs",
               str(args.pairs), "--threads", str(args.threads), "--shared", args.shared] + \
              (["--no-profile"] if args.no_profile else []) + (["--live-memory"] if args.live_memory else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            results.append({"name": name, "failed": (proc.stderr.strip().splitlines() or ["no output"])[-1]})
        else:
            results.append(json.loads(lines[-1][len("RESULT "):]))
        print_variant(results[-1])
        if args.json:
            Path(args.json).write_text(json.dumps({"settings": vars(args), "variants": results}, indent=1))


def print_variant(r: dict) -> None:
    if "failed" in r:
        print(f"\n## {r['name']}: failed: {r['failed']}")
        return
    layout, chunked, attention, ckpt = VARIANTS[r["name"]]
    recompute = {True: ", grad ckpt", "selective": ", selective recompute"}.get(ckpt, "")
    described = f"{layout}, {'chunked' if chunked else 'plain'} LM head, {attention}{recompute}"
    step = r["step2"]
    total = sum(v["cpu_s"] for k, v in step.items() if isinstance(v, dict))
    print(f"\n## {r['name']} ({described}): peak RSS {r['peak_rss_mb']:.0f} MB; batch holds {r['tokens_in_batch']} token slots "
          f"for {r['real_tokens']} tokens; step 1 loss {r['step1']['loss_value']:.6f}")
    gap = r["what_the_loss_sees"]
    print(f"  against padded + plain head: log-prob gap {gap['max_logp_gap']:.2e} (sums up to {gap['largest_sum']:.0f}), "
          f"loss gap {gap['loss_gap']:.2e}")
    saved = r["saved_for_backward_mb"]
    print(f"  saved for backward {sum(saved.values()):.0f} MB: " + "; ".join(f"{k} {v:.0f}" for k, v in saved.items()))
    print(f"  reference pass {r['reference_pass_cpu_s']:.2f} CPU s; step 2: {total:.2f} CPU s = " + ", ".join(
        f"{k} {v['cpu_s']:.2f} ({v['cpu_s'] / total:.0%})" for k, v in step.items() if isinstance(v, dict)))
    if "profile" in r:
        ops = r["profile"]["by_op_class"]
        whole = sum(ops.values())
        print("  forward + backward by op class (self CPU s): " + "; ".join(
            f"{k} {v:.2f} ({v / whole:.0%})" for k, v in ops.items()))
        print("  by layer (wall s): " + json.dumps(r["profile"]["by_layer"]))


if __name__ == "__main__":
    main()
