"""The side-by-side benchmark's --smoke mode runs end to end (dpokit only: TRL is not installed in CI)."""

import json
import math
import subprocess
import sys
from pathlib import Path

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
