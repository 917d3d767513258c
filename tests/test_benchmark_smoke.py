"""The side-by-side benchmark's --smoke mode runs end to end (dpokit only: TRL is not installed in CI)."""

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_vs_trl.py"


@pytest.mark.slow
def test_benchmark_smoke_mode_reports_dpokit_figures(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--trl-python", str(tmp_path / "no-trl"),
                           "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "TRL columns skipped" in proc.stdout
    [row] = json.loads(out.read_text())["sections"]["smoke"]
    assert row["name"] == "dpokit (defaults)" and row["pairs_per_s"] > 0 and row["peak_rss_mb"] > 0
    assert row["losses"][0] == pytest.approx(math.log(2), abs=1e-5)
    assert any("reference log-probs of 24 pairs: computed" in note for note in row["notes"])


def test_length_section_reads_slope_and_budget_lengths_off_the_points(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import bench_length

    # 500 MB + 300 MB per 1k tokens: 3072 MB is reached at (3072 - 500) / 300 * 1024 = 8777 tokens.
    rows = {n: [{"name": "linear", "peak_rss_mb": 500 + 300 * n / 1024, "pairs_per_s": 1.0}]
            for n in bench_length.LENGTHS}
    figures = bench_length.summarise_lengths(rows, None)["linear"]
    assert figures["slope_mb_per_1k"] == pytest.approx(300)
    assert figures["intercept_mb"] == pytest.approx(500)
    assert figures["longest_measured_under_budget"] == 8192
    assert figures["longest_by_fit"] == pytest.approx((3072 - 500) / 300 * 1024)


def test_budget_bisection_finds_the_longest_length_that_fits(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import budget_length

    tried = []

    def fake_try(python, kind, folder, opts, budget_mb, cap):
        length = opts["max_length"] - 64
        tried.append(length)
        peak = 1000 + 300 * length / 1024  # crosses 3072 MB at 7072 tokens
        return {"fits": peak <= budget_mb, "peak_rss_mb": peak, "peak_vm_mb": None, "losses": None,
                "wall_s": 0.0, "why": ""}

    monkeypatch.setattr(budget_length, "capped_try", fake_try)
    monkeypatch.setattr(budget_length, "prepare", lambda folder, spec: None)
    args = SimpleNamespace(budget_mb=3072, cap="rss", lo=4096, hi=8192, step=256, threads=1,
                           trl_python=sys.executable)
    found = budget_length.bisect("dpokit defaults + ckpt", args, tmp_path)
    assert found["longest"] == 6912 and found["first_fail"] == 7168
    assert tried[:2] == [4096, 8192] and len(tried) == 2 + 4  # 4096 -> 256 tokens in four halvings
