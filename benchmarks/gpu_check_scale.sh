#!/usr/bin/env bash
# GPU check for scale-out (issue 9): the same small DPO job under each precision and strategy,
# figures side by side in one table. Needs CUDA; on N >= 2 GPUs it also runs DDP and FSDP2 on all
# of them, on one GPU FSDP2 runs as a world of one (sharding is then a no-op, CPU offload is not).
#
#   bash benchmarks/gpu_check_scale.sh            # from the repository root, with .venv installed
#   STEPS=40 HIDDEN=1024 LAYERS=16 bash benchmarks/gpu_check_scale.sh
#   CPU_DRY_RUN=1 bash benchmarks/gpu_check_scale.sh   # checks the script itself on CPU (gloo, 2 ranks)
#
# Columns: final loss, mean pairs/s over the run's log lines after the first (warm-up), peak GPU
# memory (MiB, rank 0), and the largest weight difference to the fp32 single-process run (for the
# runs that should match it: fp32 DDP/FSDP2 with the same global batch; bf16/fp16 are expected to
# differ by rounding). Paste the table into benchmarks/RESULTS.md with the GPU name and date.
# The tiny-model builders live with the tests (tests/helpers/toy.py).
export PYTHONPATH="$(cd "$(dirname "$0")/.." && pwd)/tests${PYTHONPATH:+:$PYTHONPATH}"
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
STEPS=${STEPS:-30}
HIDDEN=${HIDDEN:-768}
LAYERS=${LAYERS:-12}
WORK=${WORK:-$(mktemp -d)}
if [[ -n ${CPU_DRY_RUN:-} ]]; then
  GPUS=2; STEPS=2; HIDDEN=64; LAYERS=2
else
  "$PY" -c "import torch; assert torch.cuda.is_available(), 'this check needs CUDA'"
  GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
fi
echo "work folder: $WORK   GPUs: $GPUS   model: hidden $HIDDEN x $LAYERS layers   steps: $STEPS"

"$PY" - "$WORK" "$HIDDEN" "$LAYERS" <<'EOF'
import sys
from pathlib import Path
from helpers.toy import build_tokenizer, build_tiny_llama, make_pairs, write_jsonl
work, hidden, layers = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
tok = build_tokenizer("word")
model = build_tiny_llama(tok, seed=0, hidden=hidden, layers=layers, heads=max(4, hidden // 64))
model.save_pretrained(work / "model"); tok.save_pretrained(work / "model")
write_jsonl(work / "train.jsonl", make_pairs(4096, seed=1))
print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters")
EOF

COMMON=(--model "$WORK/model" --data "$WORK/train.jsonl" --max-steps "$STEPS" --learning-rate 1e-5
        --lr-scheduler constant --max-length 64 --progress off --log-every 5 --overwrite)
BATCH=16  # global batch 16 x 2 accumulation in every run, however it is split over GPUs
run() {  # name, launcher..., -- extra dpokit flags
  local name=$1; shift
  local launcher=()
  while [[ $1 != -- ]]; do launcher+=("$1"); shift; done; shift
  echo "== $name"
  "${launcher[@]}" -m dpokit train "${COMMON[@]}" --output "$WORK/$name" "$@" > "$WORK/$name.log" 2>&1 \
    || { echo "   FAILED: tail of $WORK/$name.log"; tail -5 "$WORK/$name.log"; }
}
SINGLE=("$PY")
TORCHRUN=("$PY" -m torch.distributed.run --standalone --nproc-per-node "$GPUS")

run fp32-1gpu "${SINGLE[@]}" -- --batch-size $BATCH --gradient-accumulation-steps 2
run bf16-1gpu "${SINGLE[@]}" -- --batch-size $BATCH --gradient-accumulation-steps 2 --dtype bf16
run fp16-1gpu "${SINGLE[@]}" -- --batch-size $BATCH --gradient-accumulation-steps 2 --dtype fp16
run bf16-ckpt-1gpu "${SINGLE[@]}" -- --batch-size $BATCH --gradient-accumulation-steps 2 --dtype bf16 --gradient-checkpointing
run lora-bf16-1gpu "${SINGLE[@]}" -- --batch-size $BATCH --gradient-accumulation-steps 2 --dtype bf16 --lora-r 16 \
    --learning-rate 1e-4
if "$PY" -c "import bitsandbytes" 2>/dev/null; then
  run qlora-bf16-1gpu "${SINGLE[@]}" -- --batch-size $BATCH --gradient-accumulation-steps 2 --dtype bf16 --lora-r 16 \
      --load-in-4bit --learning-rate 1e-4
else
  echo "== qlora: skipped (pip install bitsandbytes to include it)"
fi
PER=$((BATCH / GPUS)); [[ $PER -lt 1 ]] && PER=1
run fsdp-fp32 "${TORCHRUN[@]}" -- --parallel fsdp --batch-size $PER --gradient-accumulation-steps 2
run fsdp-bf16 "${TORCHRUN[@]}" -- --parallel fsdp --batch-size $PER --gradient-accumulation-steps 2 --dtype bf16
[[ -z ${CPU_DRY_RUN:-} ]] && run fsdp-bf16-offload "${TORCHRUN[@]}" -- --parallel fsdp --fsdp-cpu-offload --batch-size $PER \
    --gradient-accumulation-steps 2 --dtype bf16
run fsdp-lora-bf16-ckpt "${TORCHRUN[@]}" -- --parallel fsdp --batch-size $PER --gradient-accumulation-steps 2 \
    --dtype bf16 --lora-r 16 --learning-rate 1e-4 --gradient-checkpointing
if [[ $GPUS -ge 2 ]]; then
  run ddp-fp32 "${TORCHRUN[@]}" -- --parallel ddp --batch-size $PER --gradient-accumulation-steps 2
  run ddp-bf16 "${TORCHRUN[@]}" -- --parallel ddp --batch-size $PER --gradient-accumulation-steps 2 --dtype bf16
else
  echo "== ddp: skipped (needs 2 GPUs; NCCL cannot put two ranks on one GPU)"
fi

"$PY" - "$WORK" <<'EOF'
import json, sys
from pathlib import Path
import torch
from safetensors.torch import load_file
work = Path(sys.argv[1])
ref = work / "fp32-1gpu" / "model.safetensors"
ref_w = load_file(str(ref)) if ref.exists() else None
print(f"\n{'run':<22}{'final loss':>11}{'pairs/s':>10}{'peak MiB':>10}{'max |w - fp32|':>16}")
for folder in sorted(p for p in work.iterdir() if p.is_dir() and (p / "metrics.jsonl").exists()):
    rows = [json.loads(l) for l in (folder / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    if not rows:
        continue
    speed = [r["throughput/pairs_per_s"] for r in rows[1:]] or [rows[0]["throughput/pairs_per_s"]]
    diff = "-"
    if ref_w is not None and (folder / "model.safetensors").exists():
        w = load_file(str(folder / "model.safetensors"))
        diff = f"{max((w[k].float() - ref_w[k]).abs().max().item() for k in ref_w):.2e}"
    print(f"{folder.name:<22}{rows[-1]['loss']:>11.4f}{sum(speed) / len(speed):>10.1f}"
          f"{rows[-1].get('memory/peak_mb', float('nan')):>10.0f}{diff:>16}")
device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (dry run)"
print(f"\n{device}, torch {torch.__version__}")
EOF
