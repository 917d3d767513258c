"""WPO, LD-DPO and the logged rewards/*, logps/* (IPO and sigmoid_norm included) against TRL 1.16's
DPOTrainer in float64 (benchmarks/trl_loss_parity.py).

TRL is never a runtime dependency of dpokit; the dev extra pins trl==1.16.0, so `make test` (and CI)
runs this test. Installs without the dev extra skip it, saying so; the behaviour itself is also
pinned by hand-worked values in tests/test_losses_wpo.py and tests/test_losses_ld_dpo.py."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("trl", reason="TRL is not installed: install dpokit's dev extra (pip install -e '.[dev]' "
                                  "-c constraints.txt), which pins trl==1.16.0")
pytest.importorskip("datasets", reason="TRL's DPOTrainer needs datasets")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "trl_loss_parity.py"


@pytest.mark.slow  # ~20 s on 2 loaded CPU cores, most of it importing TRL and building its trainers
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
