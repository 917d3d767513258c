#!/usr/bin/env bash
# GPU check, under 8 minutes on one H100: (1) the layout / chunked-head equivalence tests on CUDA,
# (2) a bf16 training run through the real CLI, (2b) peak GPU memory with --activation-offload, (3) dpokit vs TRL on a Qwen2-0.5B-shaped model
# (random weights from a config, bf16, 512 pairs, batch 8, 4 warm-up + 20 timed steps).
#
#   bash benchmarks/gpu_check.sh                      # from the repository root
#   PYTHON=/path/python TRL_PYTHON=/path/trl-python bash benchmarks/gpu_check.sh
#
# Needs a python with a CUDA build of torch and dpokit's dependencies (pip install -e '.[dev]'
# after installing the torch you want); no network is needed. TRL is optional: point TRL_PYTHON
# at a python that imports trl (its own environment); without it the TRL rows are skipped.
# Everything is printed and also kept in ${OUT:-gpu-check-out}/ (log + JSON).
# The tiny-model builders live with the tests (tests/helpers/toy.py).
export PYTHONPATH="$(cd "$(dirname "$0")/.." && pwd)/tests${PYTHONPATH:+:$PYTHONPATH}"
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(test -x .venv/bin/python && echo .venv/bin/python || echo python3)}
TRL_PYTHON=${TRL_PYTHON:-/nonexistent}
OUT=${OUT:-gpu-check-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
status=0
step() { echo; echo "=== $* ($(date +%T))"; }

step "0. environment"
"$PYTHON" - <<'EOF' || exit 1
import torch, transformers
assert torch.cuda.is_available(), "no CUDA device visible"
print("torch", torch.__version__, "transformers", transformers.__version__, "device", torch.cuda.get_device_name())
EOF
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

step "1. equivalence tests on CUDA (fp32, 1e-5): every layout x chunked head x Llama/Qwen2/GPT-2"
DPOKIT_TEST_DEVICE=cuda timeout 240 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_layouts.py \
    2>&1 | tee "$OUT/equivalence.log" | tail -5 || status=1

step "2. bf16 run through the CLI (tiny model; first loss must be ln 2, all finite)"
timeout 120 "$PYTHON" - <<'EOF' 2>&1 | tee "$OUT/bf16.log" || status=1
import json, math, subprocess, sys, tempfile
from pathlib import Path
from helpers.toy import make_pairs, save_tiny_model, write_jsonl
tmp = Path(tempfile.mkdtemp())
model = save_tiny_model(tmp / "m")
data = write_jsonl(tmp / "d.jsonl", make_pairs(64, seed=1))
proc = subprocess.run([sys.executable, "-m", "dpokit", "train", "--model", model, "--data", data, "--output",
                       tmp / "run", "--dtype", "bf16", "--device", "cuda", "--max-steps", "8", "--batch-size", "8",
                       "--learning-rate", "1e-3", "--max-length", "32", "--progress", "off"],
                      capture_output=True, text=True)
print(proc.stdout[-1500:], proc.stderr[-1500:])
assert proc.returncode == 0
losses = [json.loads(l)["loss"] for l in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
print("bf16 losses:", [round(x, 4) for x in losses])
assert abs(losses[0] - math.log(2)) < 1e-2 and all(math.isfinite(x) for x in losses)
print("bf16 run OK")
EOF

step "2b. --activation-offload: peak GPU memory of the same 3 bf16 steps with and without (long prompts)"
timeout 180 "$PYTHON" - <<'EOF' 2>&1 | tee "$OUT/offload.log" || status=1
import json, subprocess, sys, tempfile
from pathlib import Path
from helpers.toy import make_pairs, save_tiny_model, write_jsonl
tmp = Path(tempfile.mkdtemp())
model = save_tiny_model(tmp / "m")
rows = [{**r, "prompt": (r["prompt"] + " ") * 40} for r in make_pairs(16, seed=2)]  # long prompts
data = write_jsonl(tmp / "d.jsonl", rows)
peaks = {}
for name, extra in (("default", []), ("offload", ["--activation-offload"])):
    out = tmp / name
    proc = subprocess.run([sys.executable, "-m", "dpokit", "train", "--model", model, "--data", data, "--output", out,
                           "--dtype", "bf16", "--device", "cuda", "--max-steps", "3", "--batch-size", "8",
                           "--max-length", "1024", "--progress", "off", *extra], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-1500:]
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    peaks[name] = max(r.get("memory/peak_mb", 0.0) for r in records)
    print(name, "losses", [round(r["loss"], 5) for r in records if "loss" in r], "peak GPU MB", round(peaks[name], 1))
print(f"activation offload: peak GPU memory x{peaks['offload'] / peaks['default']:.2f} (same losses expected)")
EOF

step "3. dpokit vs TRL, Qwen2-0.5B-shaped, bf16"
timeout 330 "$PYTHON" benchmarks/bench_vs_trl.py --device cuda --dtype bf16 --sections gpu --threads 8 \
    --trl-python "$TRL_PYTHON" --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" | grep -v Writing || status=1

step "done: status $status (0 = all passed); logs in $OUT/"
exit $status
