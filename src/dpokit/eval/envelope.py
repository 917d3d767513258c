"""A method's reward–KL frontier as the upper envelope of its points, and two frontiers compared.

The DPO paper (Figure 2) evaluates every run at checkpoints along its training and plots judged
reward against KL to the reference; a method's frontier is the most reward it reaches at each
KL. Here a method's frontier is the upper concave hull of its points and of the model they all
started from (KL 0), kept flat after its best point. Every point on it is reachable: a policy
that follows checkpoint A on a share λ of the prompts and checkpoint B on the rest has reward
λ·r_A + (1 − λ)·r_B and, KL being convex, at most λ·KL_A + (1 − λ)·KL_B; and a policy may always
stop at its best checkpoint (flat after it).

Two frontiers are compared by their mean vertical gap over the KL range where both methods
have points of their own (no stretch reached only by the line from the start), and that gap's
standard error by a bootstrap over the held-out prompts: every point was measured on the same
prompts, so a resample of prompts moves all points together, as the data does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

Point = tuple[float, float]  # (KL, reward)


def upper_envelope(points: Sequence[Point]) -> list[Point]:
    """The vertices of the points' upper concave hull, by KL, up to the highest reward."""
    hull: list[Point] = []
    for x, y in sorted(set(points), key=lambda p: (p[0], -p[1])):
        if hull and hull[-1][0] == x:  # the same KL, lower reward: never on the hull
            continue
        # Drop the last vertex while it lies on or under the chord from the one before it to (x, y).
        while len(hull) >= 2 and _cross(hull[-2], hull[-1], (x, y)) >= 0:
            hull.pop()
        hull.append((x, y))
    best = max(range(len(hull)), key=lambda i: hull[i][1])  # the first highest: the hull falls after it
    return hull[:best + 1]


def _cross(o: Point, a: Point, b: Point) -> float:
    """> 0 when o → a → b turns left (a lies under the chord o → b)."""
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def frontier(points: Sequence[Point], start: Point) -> list[Point]:
    """A method's frontier: the upper envelope of its points and of the model they started from,
    flat after its best point out to its farthest one. A KL estimated below the start's (sampling
    noise: a KL is never negative) counts as the start's."""
    at_least = [(max(x, start[0]), y) for x, y in points]
    envelope = upper_envelope([start, *at_least])
    farthest = max(x for x, _ in at_least)
    return envelope + [(farthest, envelope[-1][1])] if farthest > envelope[-1][0] else envelope


def envelope_at(envelope: Sequence[Point], x: float) -> float:
    """The envelope's reward at KL `x` (from its first vertex on; flat after its last)."""
    if x < envelope[0][0]:
        raise ValueError(f"KL {x} lies before the envelope's first point {envelope[0][0]}")
    for (x0, y0), (x1, y1) in zip(envelope, envelope[1:], strict=False):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return envelope[-1][1]


def mean_gap(upper: Sequence[Point], lower: Sequence[Point], start: float, stop: float) -> float:
    """Mean of envelope `upper` minus envelope `lower` over KL [start, stop], exactly: both are
    straight between their vertices, so the trapezoid rule on every vertex inside is exact."""
    if stop <= start:
        return envelope_at(upper, start) - envelope_at(lower, start)
    xs = sorted({start, stop, *(x for x, _ in (*upper, *lower) if start < x < stop)})
    gaps = [envelope_at(upper, x) - envelope_at(lower, x) for x in xs]
    area = sum((x1 - x0) * (g0 + g1) / 2 for x0, x1, g0, g1 in zip(xs, xs[1:], gaps, gaps[1:], strict=False))
    return area / (stop - start)


@dataclass(frozen=True)
class Gap:
    """How far one method's frontier lies above another's, over the KL range both cover."""

    margin: float  # mean gap, reward units (negative: below)
    stderr: float  # bootstrap standard error over the held-out prompts
    kl_start: float
    kl_stop: float
    replicates: int


def common_range(first: Sequence[Point], second: Sequence[Point]) -> tuple[float, float] | None:
    """The KL range where both methods have points of their own, or None when they share none."""
    start = max(min(x for x, _ in first), min(x for x, _ in second))
    stop = min(max(x for x, _ in first), max(x for x, _ in second))
    return (start, stop) if start <= stop else None


def frontier_gap(upper: Sequence[Point], lower: Sequence[Point], base: Point) -> tuple[float, float, float] | None:
    """(mean gap, KL start, KL stop) of `upper`'s frontier over `lower`'s, both from `base`; None
    when the methods' points share no KL range."""
    upper, lower = ([(max(x, base[0]), y) for x, y in points] for points in (upper, lower))  # as `frontier` reads them
    span = common_range(upper, lower)
    if span is None:
        return None
    gap = mean_gap(frontier(upper, base), frontier(lower, base), *span)
    return gap, *span


@dataclass(frozen=True)
class PromptFigures:
    """One point's figures per held-out prompt (each the mean over that prompt's samples); every
    point of a comparison was measured on the same prompts, in the same order."""

    kl: Sequence[float]
    reward: Sequence[float]


def frontier_gap_with_stderr(upper: Sequence[PromptFigures], lower: Sequence[PromptFigures],
                             base_reward: Sequence[float], *, replicates: int = 1000, seed: int = 0) -> Gap | None:
    """`frontier_gap` of the points' means, with its standard error from `replicates` resamples of
    the prompts (the same resample for every point and the base model; seeded: reproducible)."""
    n = len(base_reward)
    if any(len(p.kl) != n or len(p.reward) != n for p in (*upper, *lower)):
        raise ValueError("every point needs one figure per held-out prompt, the same prompts")
    rewards = torch.tensor([[*p.reward] for p in (*upper, *lower)] + [list(base_reward)], dtype=torch.float64)
    kls = torch.tensor([[*p.kl] for p in (*upper, *lower)] + [[0.0] * n], dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    resamples = torch.randint(0, n, (replicates, n), generator=generator)
    # Column 0: the data itself; then one column per resample.
    reward_means = torch.cat([rewards.mean(1, keepdim=True), rewards[:, resamples].mean(2)], 1).T.tolist()
    kl_means = torch.cat([kls.mean(1, keepdim=True), kls[:, resamples].mean(2)], 1).T.tolist()
    gaps = []
    for kl, reward in zip(kl_means, reward_means, strict=True):
        points = list(zip(kl, reward, strict=True))
        gaps.append(frontier_gap(points[:len(upper)], points[len(upper):-1], points[-1]))
    if gaps[0] is None:
        return None
    # A resample whose points share no KL range has no gap: it is left out (counted in `replicates`).
    spread = torch.tensor([g[0] for g in gaps[1:] if g is not None], dtype=torch.float64)
    stderr = float(spread.std()) if len(spread) > 1 else float("nan")
    margin, start, stop = gaps[0]
    return Gap(margin, stderr, start, stop, len(spread))
