#!/usr/bin/env bash
# GPU checks for docs/benchmarks.md, on a machine with a CUDA GPU and fitscope's
# training dependencies importable (the CSV parser is not needed).
#   bash scripts/gpu_check.sh [OUT_DIR] [debug|full|all]      (default reports/gpu all)
# debug: `trainer=gpu` debug runs at each precision (and `auto`), the dropout mask and the
#        fused optimizers on CUDA, then the 512x4 model's training throughput
#        (python -m fitscope.bench --gpu).
# full:  one full-size synthetic HIGGS split (10.5M training rows, memory-mapped, written
#        straight to .npy) trained for 2 epochs with data=higgs_full model=full trainer=gpu.
set -euo pipefail
out=${1:-reports/gpu}
part=${2:-all}
mkdir -p "$out"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -c "import torch, pytorch_lightning as pl; print('torch', torch.__version__, \
'lightning', pl.__version__, torch.cuda.get_device_name(0), 'cpus', __import__('os').cpu_count())" |
  tee -a "$out/gpu.txt"
if [[ $part == debug || $part == all ]]; then
  if [[ ! -f data/processed/higgs/manifest.json ]]; then  # else: carried in, verified on load
    python -m fitscope.cli fetch higgs
    python -m fitscope.cli split higgs
  fi
  for precision in auto 32-true bf16-mixed 16-mixed; do
    python -m fitscope.train trainer=gpu model=large logger=none trainer.max_epochs=5 \
      trainer.precision="$precision" paths.run_dir="$out/debug-$precision" 2>&1 |
      tee -a "$out/debug.log"
    cat "$out/debug-$precision/metrics.json" >> "$out/debug.log"
  done
  # The dropout mask and the fused optimizers on CUDA (issue 22): 0/1 values, the kept
  # fraction, and a dropout run that trains.
  python -c "import torch; from fitscope.model.mlp import keep_mask; \
from fitscope.training.module import build_optimizer; \
[print('keep_mask', dt, sorted(m.unique().tolist()), round(m.float().mean().item(), 4)) \
 for dt in (torch.bfloat16, torch.float16, torch.float32) \
 for m in [keep_mask(torch.empty(4_000_000, device='cuda', dtype=dt), 0.8)]]; \
p = [torch.nn.Parameter(torch.randn(64, 64, device='cuda'))]; \
print('fused', build_optimizer(p, {'name': 'adam', 'lr': 0.1}).defaults['fused'])" |
    tee "$out/dropout.log"
  python -m fitscope.train trainer=gpu model=large regularization=dropout logger=none \
    trainer.max_epochs=5 paths.run_dir="$out/debug-dropout" 2>&1 | tee -a "$out/dropout.log"
  cat "$out/debug-dropout/metrics.json" >> "$out/dropout.log"
  python -m fitscope.bench --gpu --out "$out/gpu_bench.json" 2>&1 | tee "$out/bench.log"
fi
if [[ $part == full || $part == all ]]; then
  data=$(mktemp -d)  # 1.3 GB: not under $out
  python -c "import time; from fitscope.data.synthetic import write_synthetic_split as w; \
t = time.time(); m = w('$data/higgs', 10_500_000); \
print({k: v['rows'] for k, v in m['splits'].items()}, f'written in {time.time() - t:.1f} s')" |
    tee "$out/full.log"
  for batch in 1000 8192; do
    python -m fitscope.train data=higgs_full model=full trainer=gpu trainer.max_epochs=2 \
      data.batch_size="$batch" logger=none progress_every_s=0 paths.data_dir="$data" \
      paths.run_dir="$out/full-$batch" 2>&1 | grep -v Warning | tee -a "$out/full.log"
    cat "$out/full-$batch/metrics.json" >> "$out/full.log"
  done
  rm -rf "$data"
fi
