"""Data pipeline throughput and memory on a synthetic JSON Lines file.

    .venv/bin/python benchmarks/data_pipeline.py --rows 1000000

Prints, side by side: a bare `json.loads` pass over the file (the floor: every row parsed once),
dpokit's read + normalise pass, and read + normalise + tokenize (word tokenizer), with rows/s
and the peak resident memory of the process after each phase.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

from dpokit.config import DataConfig
from dpokit.data import read_pairs
from dpokit.data.tokenize import PairTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tiny-model builders
from helpers.toy import GLOOMY, NEUTRAL, OPENERS, UPBEAT, build_tokenizer  # noqa: E402


def write_rows(path: Path, n: int) -> None:
    rng = random.Random(0)
    with path.open("w", encoding="utf-8") as handle:
        for i in range(n):
            prompt = " ".join(rng.choice(OPENERS + NEUTRAL) for _ in range(rng.randint(8, 40)))
            chosen = " " + " ".join(rng.choice(UPBEAT + NEUTRAL) for _ in range(rng.randint(5, 60)))
            rejected = " " + " ".join(rng.choice(GLOOMY + NEUTRAL) for _ in range(rng.randint(5, 60)))
            handle.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected, "id": i}) + "\n")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=200_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "prefs.jsonl"
        write_rows(path, args.rows)
        size_mb = path.stat().st_size / 2**20
        print(f"{args.rows} rows, {size_mb:.0f} MiB of JSON Lines")
        results = []

        start = time.perf_counter()
        with path.open(encoding="utf-8") as handle:
            count = sum(1 for line in handle if json.loads(line))
        results.append(("json.loads only (floor)", count, time.perf_counter() - start, peak_mb()))

        start = time.perf_counter()
        count = sum(1 for _ in read_pairs(str(path), DataConfig()))
        results.append(("dpokit read + normalise", count, time.perf_counter() - start, peak_mb()))

        start = time.perf_counter()
        pairs, stats = PairTokenizer(build_tokenizer("word"), max_length=256).tokenize(
            read_pairs(str(path), DataConfig()))
        results.append(("+ tokenize (kept in memory)", len(pairs), time.perf_counter() - start, peak_mb()))

    print(f"{'phase':<30}{'rows':>10}{'seconds':>10}{'rows/s':>12}{'peak RSS MiB':>14}")
    for name, rows, seconds, mb in results:
        print(f"{name:<30}{rows:>10}{seconds:>10.2f}{rows / seconds:>12.0f}{mb:>14.0f}")


if __name__ == "__main__":
    main()
