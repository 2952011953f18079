#!/usr/bin/env bash
# GPU checks for docs/benchmarks.md, on a machine with a CUDA GPU and fitscope's
# dependencies importable: `trainer=gpu` debug runs at each precision, then the
# 512x4 model's training throughput (python -m fitscope.bench --gpu).
#   bash scripts/gpu_check.sh [OUT_DIR]      (default reports/gpu)
set -euo pipefail
out=${1:-reports/gpu}
mkdir -p "$out"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -c "import torch, pytorch_lightning as pl; print('torch', torch.__version__, \
'lightning', pl.__version__, torch.cuda.get_device_name(0))" | tee -a "$out/gpu.txt"
python -m fitscope.cli fetch higgs
python -m fitscope.cli split higgs
for precision in 32-true bf16-mixed 16-mixed; do
  python -m fitscope.train trainer=gpu model=large logger=none trainer.max_epochs=5 \
    trainer.precision="$precision" paths.run_dir="$out/debug-$precision" 2>&1 |
    tee -a "$out/debug.log"
  cat "$out/debug-$precision/metrics.json" >> "$out/debug.log"
done
python -m fitscope.bench --gpu --out "$out/gpu_bench.json" 2>&1 | tee "$out/bench.log"
