"""WPO, LD-DPO and the logged rewards/*, logps/* (IPO and sigmoid_norm included) against TRL 1.16's
DPOTrainer in float64 (benchmarks/trl_loss_parity.py).

TRL is never a dependency of dpokit and CI does not install it: there this test is skipped and the
script's printed table (benchmarks/RESULTS.md) is the evidence; the behaviour itself is pinned by
hand-worked values in tests/test_losses_wpo.py and tests/test_losses_ld_dpo.py."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("trl", reason="TRL is not installed (CI lacks it); run benchmarks/trl_loss_parity.py with "
                                  "TRL's own environment instead")
pytest.importorskip("datasets", reason="TRL's DPOTrainer needs datasets")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "trl_loss_parity.py"


def test_wpo_and_ld_dpo_match_trl_in_float64():
    spec = importlib.util.spec_from_file_location("trl_loss_parity", SCRIPT)
    parity = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(parity)
    for name, gaps in parity.run(exact=True):
        # float64 sums of up to 9 log-probs of magnitude ~5 and losses of magnitude ~1: far below 1e-10
        assert max(v for k, v in gaps.items() if k != "metrics") < 1e-10, (name, gaps)
        # The logged means are accumulated in float32 (metrics.PairMetrics): each of the 6 per-pair
        # values (|x| <= 45: 9 tokens of a 64-word vocabulary) is rounded, summed and divided,
        # about 7 roundings of relative size 2**-24 on magnitudes up to 45: 2e-5.
        assert gaps["metrics"] < 7 * 2**-24 * 45, (name, gaps)
