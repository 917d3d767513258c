"""Peak memory of one forward + backward of one long pair, per attention kind and layout.

    PYTHONPATH=src .venv/bin/python benchmarks/attention_memory.py --lengths 1024,2048,4096,8192

Each measurement runs in its own process: the bench Llama (vocab 8192, hidden 256, 4 layers, 4
heads) with gradient checkpointing, one pair whose prompt and responses are each length/2
tokens, `sequence_logps` and a backward. Printed: the growth of the process's peak RSS during
that step (MB) and its wall time. "segments" is dpokit's segment attention (`--attention
segments`), "masks" the [T x T] masks (`--attention masks`).
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time


def measure(attention: str, layout: str, length: int, threads: int) -> str:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from dpokit.data.batching import collate
    from dpokit.data.tokenize import TokenizedPair
    from dpokit.model.attention import choose_attention
    from dpokit.model.logprobs import sequence_logps

    torch.set_num_threads(threads)
    config = LlamaConfig(vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2 * length,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    choose_attention(model, attention)
    half = length // 2
    tokens = torch.randint(4, 8192, (3 * half,), generator=torch.Generator().manual_seed(0)).tolist()
    pair = TokenizedPair(tokens[:half], tokens[half : 2 * half], tokens[2 * half : 3 * half - 7], 0)
    batch = collate([pair], 0, layout)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    out = sequence_logps(model, batch)
    (out.chosen_logps - out.rejected_logps).sum().backward()
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    return f"{attention:9} {layout:14} {length:6d} {grown:10.0f} {time.perf_counter() - started:8.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024,2048,4096,8192")
    parser.add_argument("--layouts", default="packed,prefix-shared")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)  # attention layout length: one measurement
    args = parser.parse_args()
    if args.one:
        print(measure(args.one[0], args.one[1], int(args.one[2]), args.threads), flush=True)
        return
    print(f"{'attention':9} {'layout':14} {'length':>6} {'peak+ MB':>10} {'wall s':>8}")
    for length in map(int, args.lengths.split(",")):
        for layout in args.layouts.split(","):
            for attention in ("masks", "segments"):
                proc = subprocess.run([sys.executable, __file__, "--threads", str(args.threads), "--one", attention,
                                       layout, str(length)], capture_output=True, text=True)
                print(proc.stdout.strip() or f"{attention} {layout} {length}: failed: {proc.stderr[-300:]}", flush=True)


if __name__ == "__main__":
    main()
