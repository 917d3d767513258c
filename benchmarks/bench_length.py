"""The "length" section of bench_vs_trl.py: peak memory and pairs/s against pair length.

For each length L (1k, 2k, 4k, 8k tokens): 4 pairs whose prompt and responses are each about
L/2 tokens (every sequence about L tokens), batch 2, 1 warm-up + 1 timed step, both tools in
their most frugal setting with gradient checkpointing (TRL: `precompute_ref_log_probs=True`,
`gradient_checkpointing=True`; dpokit: defaults plus `--gradient-checkpointing`, and the same
with `--malloc-mmap-threshold 0`: malloc's adaptive threshold, which the default `auto` replaces
by a fixed one from 3072-token sequences on). `attention_memory.py` compares segment attention with the [T x T] masks alone.
Reported per configuration:
the least-squares slope of peak RSS against L, and the longest pair that fits a memory budget
as read off the measured points (the longest measured L under the budget) and off the fit.
"""

from __future__ import annotations

from pathlib import Path

LENGTHS = (1024, 2048, 4096, 8192)
BUDGET_MB = 3072
STEPS, WARMUP, BATCH, PAIRS = 1, 1, 2, 4


def length_spec(base: dict, length: int) -> dict:
    half = length // 2
    return {**base, "pairs": PAIRS, "positions": 2 * length, "prompt": (half - 32, half), "response": (half - 32, half)}


def length_configs(me: str, trl: str | None, length: int) -> list[tuple]:
    frugal = {"batch": BATCH, "max_length": length + 64}
    checkpointing = {**frugal, "scale": {"gradient_checkpointing": True}}
    return [
        ("TRL precompute_ref_log_probs", trl, "trl", {**frugal, "precompute": True, "gradient_checkpointing": True}),
        ("dpokit defaults + ckpt", me, "dpokit", checkpointing),
        # The same with malloc's adaptive mmap threshold kept (--malloc-mmap-threshold 0): the
        # default (auto) fixes it for sequences of 3072 tokens or more (host_memory.py).
        ("dpokit defaults + ckpt, malloc adaptive", me, "dpokit",
         {**frugal, "scale": {"gradient_checkpointing": True, "malloc_mmap_threshold": "0"}}),
        # ... and fixed at 1 MiB at every length (what auto does from 3072 tokens on).
        ("dpokit defaults + ckpt, mmap 1 MiB", me, "dpokit",
         {**frugal, "scale": {"gradient_checkpointing": True, "malloc_mmap_threshold": str(2**20)}}),
    ]


def _fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares line through (length, MB): slope in MB per 1k tokens, intercept in MB."""
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var = sum((x - mean_x) ** 2 for x, _ in points) or 1.0
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / var
    return slope * 1024, mean_y - slope * mean_x


def summarise_lengths(rows_by_length: dict[int, list[dict]], plot: Path | None) -> dict:
    """Print the memory-vs-length table, slopes and budget lengths; draw the plot; return the figures."""
    names = [r["name"] for r in next(iter(rows_by_length.values()))]
    print(f"\n## memory vs length (budget {BUDGET_MB} MB)")
    print(f"{'length':>7} " + " ".join(f"{n:>34}" for n in names) + "   (peak RSS MB / pairs/s)")
    for length, rows in rows_by_length.items():
        print(f"{length:7d} " + " ".join(f"{r['peak_rss_mb']:22.0f} / {r['pairs_per_s']:9.4f}" for r in rows))
    figures = {}
    for i, name in enumerate(names):
        points = [(length, rows[i]["peak_rss_mb"]) for length, rows in rows_by_length.items()]
        slope, intercept = _fit(points)
        under = [x for x, y in points if y <= BUDGET_MB]
        fitted = (BUDGET_MB - intercept) / slope * 1024 if slope > 0 else float("inf")
        figures[name] = {"points": points, "slope_mb_per_1k": slope, "intercept_mb": intercept,
                         "longest_measured_under_budget": max(under) if under else None,
                         "longest_by_fit": fitted}
        print(f"{name}: slope {slope:.0f} MB per 1k tokens, intercept {intercept:.0f} MB; longest measured "
              f"length under {BUDGET_MB} MB: {max(under) if under else 'none'}; by the fit: {fitted:.0f} tokens")
    if plot is not None:
        _plot(figures, plot)
    return figures


def _plot(figures: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, fig_data in figures.items():
        xs, ys = zip(*fig_data["points"], strict=True)
        ax.plot(xs, ys, marker="o", label=f"{name} ({fig_data['slope_mb_per_1k']:.0f} MB/1k)")
    ax.axhline(BUDGET_MB, color="grey", linestyle="--", linewidth=1, label=f"{BUDGET_MB} MB budget")
    ax.set_xlabel("tokens per sequence (prompt + response)")
    ax.set_ylabel("whole-process peak RSS (MB)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
