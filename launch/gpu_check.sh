#!/usr/bin/env bash
# One script for a short slot on a CUDA machine: smoke tests of every GPU-only path (nccl, fp16 + GradScaler,
# bf16, torch.compile, data on device, profiler with CUDA activity, memory snapshot), then the GPU benchmark.
# Usage: bash launch/gpu_check.sh DATA_DIR OUT_DIR     (DATA_DIR holds MNIST/raw/; a few minutes on one H100)
set -uo pipefail
data_dir=${1:?usage: gpu_check.sh DATA_DIR OUT_DIR}
out=${2:?usage: gpu_check.sh DATA_DIR OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
status=0

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())'

smoke() {  # name, then flags for launch/train.py under torchrun (nccl)
    local name=$1; shift
    local start=$SECONDS
    if "$python" -m torch.distributed.run --standalone --nproc-per-node="${NPROC:-1}" launch/train.py --data-dir "$data_dir" \
        --no-download --output-dir "$out/runs" --run-name "$name" --no-tensorboard "$@" >"$out/$name.log" 2>&1; then
        echo "PASS $name ($((SECONDS - start)) s): $(grep -E '^eval' "$out/$name.log" | tail -1)"
    else
        echo "FAIL $name ($((SECONDS - start)) s)"; tail -20 "$out/$name.log"; status=1
    fi
}

smoke fp16 --amp fp16 --max-steps 60 --grad-clip 1.0
smoke bf16 --amp bf16 --max-steps 60 --checkpoint-every 30
smoke compile --compile --max-steps 120
smoke profile --profile --cuda-memory-snapshot --max-steps 30
smoke default_1epoch --epochs 1
smoke default_2epochs --epochs 2 --eval-every 20
# DDP comm hooks over nccl, PowerSGD with torch's default buckets (gloo needs one bucket): 2 GPUs or more.
if [ "$("$python" -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
    for hook in none bf16 powersgd; do
        NPROC=2 smoke "hook_$hook" --ddp-comm-hook "$hook" --max-steps 60 --warmup-frac 0.05
        "$python" -m dist_mnist.report "$out/runs/hook_$hook" | tail -4
    done
else
    echo "SKIP comm hooks over nccl: they need 2 GPUs"
fi
# Other batch sizes, to keep the CUDA defaults honest: how fast each reaches 99%.
smoke b128 --batch-size 128 --lr 4e-3 --epochs 3 --eval-every 50
smoke b1024 --batch-size 1024 --lr 1.2e-2 --epochs 4 --eval-every 10
for run in default_1epoch default_2epochs b128 b1024; do
    "$python" - "$out/runs/$run" <<'PY'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
summary = json.loads((run / "summary.json").read_text())
hit = next((m for m in metrics if m["test_accuracy"] >= 0.99), None)
print(f"{run.name}: final {metrics[-1]['test_accuracy']:.4f}, 99% at "
      + (f"{hit['elapsed_s']:.2f} s (step {hit['step']})" if hit else "never")
      + f", {summary['samples_per_sec']:,.0f} samples/s, data share {summary['ranks'][0]['data_share']:.1%}, "
      f"startup {summary['startup_s']:.1f} s, MFU {summary['mfu']:.1%}")
PY
done
ls -la "$out/runs/profile" | head -20
for run in fp16 bf16 compile profile; do
    tail -1 "$out/runs/$run/metrics.jsonl" 2>/dev/null | sed "s/^/$run: /"
done
"$python" -m dist_mnist.report "$out/runs/default_2epochs" 2>/dev/null || cat "$out/runs/default_2epochs/summary.json"

"$python" -m dist_mnist.bench --data-dir "$data_dir" --output "$out/benchmarks.md" --json "$out/bench.json" \
    --seconds 5 || status=1
exit $status
