"""Cost of dpokit's first-batch layout check against training steps, measured side by side.

    .venv/bin/python benchmarks/layout_guard_cost.py [--repeats 5]

On the main benchmark model (Llama from config: vocab 8192, hidden 256, 4 layers; batch 8 pairs of
the benchmark's synthetic data), each repeat times the check (`check_first_batch`, as `train`
runs it under --layout auto --lm-head auto) and then one training step (policy forward and
backward in the layout auto picks, reference log-probs given, AdamW step), back to back, so a
busy spell on a shared machine hits both alike. Prints the medians and the check as a fraction
of a 100-step run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vs_trl import MAIN, prepare  # noqa: E402

from dpokit.config import build_config  # noqa: E402
from dpokit.data.pairs import PreferencePair  # noqa: E402
from dpokit.data.tokenize import PairTokenizer  # noqa: E402
from dpokit.model.layout_guard import check_first_batch  # noqa: E402
from dpokit.model.load import load_policy, load_tokenizer  # noqa: E402
from dpokit.scoring import PairScorer  # noqa: E402


def _first_batch(folder: Path, tokenizer, order: list[int]):
    rows = [json.loads(line) for line in (folder / "pairs.jsonl").read_text().splitlines()]
    picked = [PreferencePair(rows[i]["prompt"], rows[i]["chosen"], rows[i]["rejected"], i) for i in order[:8]]
    return PairTokenizer(tokenizer, max_length=2048).tokenize(picked)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    scratch = Path(tempfile.mkdtemp(prefix="dpokit-guard-"))
    info = prepare(scratch / "main", MAIN)
    tokenizer = load_tokenizer(str(scratch / "main" / "model"))
    policy = load_policy(str(scratch / "main" / "model"), torch.device("cpu"))
    pairs = _first_batch(scratch / "main", tokenizer, info["order"])
    cfg = build_config({"model": {"model": "m"}, "data": {"data": "d"}, "train": {"output": str(scratch / "run")}})
    optimizer = torch.optim.AdamW(policy.parameters(), lr=5e-6)
    reference = torch.zeros(len(pairs))
    check_s, step_s = [], []
    for _ in range(args.repeats + 1):  # the first round warms up and is not counted
        scorer = PairScorer(policy, loss=cfg.loss, speed=cfg.speed, dtype=cfg.model.dtype,
                            pad_id=tokenizer.pad_token_id, device=torch.device("cpu"))
        started = time.perf_counter()
        check_first_batch(scorer, pairs, scratch / "run", log=print)
        check_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        logps = scorer.logps(policy, scorer.batch(pairs))
        logits = 0.1 * ((logps.chosen_logps - reference) - (logps.rejected_logps - reference))
        (-torch.nn.functional.logsigmoid(logits).mean()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_s.append(time.perf_counter() - started)
    check, step = statistics.median(check_s[1:]), statistics.median(step_s[1:])
    print(f"layout check {check:.3f} s, training step {step:.3f} s (medians of {args.repeats}); "
          f"check = {check / (100 * step):.3%} of a 100-step run")


if __name__ == "__main__":
    main()
