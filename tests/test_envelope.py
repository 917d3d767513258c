"""A method's reward–KL frontier (upper envelope) and two frontiers compared, on hand-made points."""

import math
import random

import pytest

from dpokit.eval.envelope import (
    PromptFigures,
    common_range,
    envelope_at,
    frontier,
    frontier_gap,
    frontier_gap_with_stderr,
    mean_gap,
    upper_envelope,
)


def test_upper_envelope_is_the_concave_hull_up_to_the_best_point():
    points = [(0.0, 0.0), (1.0, 0.5), (2.0, 0.6), (3.0, 1.0), (4.0, 0.9), (1.0, 0.2), (2.5, 0.1)]
    # (2, 0.6) lies under the chord (1, 0.5)-(3, 1.0), which is 0.75 there; (4, 0.9) comes after the best point.
    assert upper_envelope(points) == [(0.0, 0.0), (1.0, 0.5), (3.0, 1.0)]
    # A point on a chord is not a vertex; order of the input does not matter.
    assert upper_envelope([(2.0, 1.0), (0.0, 0.0), (1.0, 0.5)]) == [(0.0, 0.0), (2.0, 1.0)]
    assert upper_envelope([(1.0, 0.3)]) == [(1.0, 0.3)]


def test_frontier_starts_at_the_base_model_and_stays_flat_after_its_best_point():
    base = (0.0, 0.2)
    # A KL estimated below 0 is read as 0: the frontier starts at the base model, never left of it.
    assert frontier([(-0.01, 0.1), (2.0, 0.6), (5.0, 0.5)], base) == [(0.0, 0.2), (2.0, 0.6), (5.0, 0.6)]
    assert frontier([(-0.01, 0.3), (2.0, 0.6)], base) == [(0.0, 0.3), (2.0, 0.6)]
    # Points all below the base model: the base model is the best, flat out to the farthest point.
    assert frontier([(1.0, 0.1)], base) == [(0.0, 0.2), (1.0, 0.2)]
    curve = frontier([(2.0, 0.6), (4.0, 0.7)], base)
    assert envelope_at(curve, 1.0) == pytest.approx(0.4)
    assert envelope_at(curve, 3.0) == pytest.approx(0.65)
    assert envelope_at(curve, 9.0) == pytest.approx(0.7)
    with pytest.raises(ValueError, match="before the envelope's first point"):
        envelope_at(curve, -1.0)


def test_mean_gap_is_the_exact_average_difference_over_the_range():
    upper = [(0.0, 0.0), (2.0, 1.0)]
    lower = [(0.0, 0.0), (1.0, 0.25), (2.0, 0.5)]
    # Over [1, 2] the gap runs straight from 0.25 to 0.5.
    assert mean_gap(upper, lower, 1.0, 2.0) == pytest.approx(0.375)
    assert mean_gap(upper, lower, 1.0, 1.0) == pytest.approx(0.25)  # an empty range: the gap at its point
    # Against a dense grid, on envelopes with vertices at different KL.
    rng, compared = random.Random(3), 0
    for _ in range(20):
        a = frontier([(rng.uniform(0, 6), rng.uniform(0, 1)) for _ in range(6)], (0.0, 0.1))
        b = frontier([(rng.uniform(0, 6), rng.uniform(0, 1)) for _ in range(6)], (0.0, 0.1))
        start, stop = 0.5, min(a[-1][0], b[-1][0])
        if stop <= start:
            continue
        xs = [start + (stop - start) * (i + 0.5) / 20000 for i in range(20000)]
        dense = sum(envelope_at(a, x) - envelope_at(b, x) for x in xs) / len(xs)
        assert mean_gap(a, b, start, stop) == pytest.approx(dense, abs=1e-6)
        compared += 1
    assert compared >= 15


def test_the_frontiers_are_compared_only_where_both_methods_have_points():
    dpo = [(1.0, 0.5), (4.0, 0.8)]
    sft = [(2.0, 0.45), (6.0, 0.5)]
    assert common_range(dpo, sft) == (2.0, 4.0)
    gap, start, stop = frontier_gap(dpo, sft, (0.0, 0.2))
    # DPO: 0.5 + 0.1·(x − 1) over [2, 4] (mean 0.7); Preferred-FT: its line 0.45 → 0.475 (mean 0.4625).
    assert (start, stop) == (2.0, 4.0) and gap == pytest.approx(0.7 - 0.4625)
    assert frontier_gap([(1.0, 0.5)], [(2.0, 0.4)], (0.0, 0.2)) is None  # no KL range in common



def test_the_gap_s_standard_error_pairs_the_prompts():
    rng = random.Random(0)
    n = 300
    base = [rng.gauss(0.2, 0.3) for _ in range(n)]
    dpo = [b + 0.4 + rng.gauss(0, 0.3) for b in base]
    sft = [d - 0.1 + rng.gauss(0, 0.05) for d in dpo]  # strongly correlated with DPO, prompt by prompt
    kl = [1.0] * n  # both at KL 1 on every prompt: the gap is the mean reward difference there
    gap = frontier_gap_with_stderr([PromptFigures(kl, dpo)], [PromptFigures(kl, sft)], base, replicates=2000)
    differences = [d - s for d, s in zip(dpo, sft, strict=True)]
    mean = sum(differences) / n
    paired = math.sqrt(sum((x - mean) ** 2 for x in differences) / (n - 1) / n)
    assert gap.margin == pytest.approx(mean) and (gap.kl_start, gap.kl_stop) == (1.0, 1.0)
    assert gap.stderr == pytest.approx(paired, rel=0.1)
    # The unpaired error would be over five times larger: the comparison uses the shared prompts.
    unpaired = math.sqrt(sum((x - sum(dpo) / n) ** 2 for x in dpo) / (n - 1) / n)
    assert unpaired > 5 * gap.stderr
    assert gap.replicates == 2000
    # Reproducible: the resamples are seeded.
    again = frontier_gap_with_stderr([PromptFigures(kl, dpo)], [PromptFigures(kl, sft)], base, replicates=2000)
    assert again == gap


def test_a_point_with_figures_for_other_prompts_is_refused():
    with pytest.raises(ValueError, match="one figure per held-out prompt"):
        frontier_gap_with_stderr([PromptFigures([1.0, 1.0], [0.5, 0.5])], [PromptFigures([1.0], [0.4])], [0.2, 0.2])
