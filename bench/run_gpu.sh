#!/usr/bin/env bash
# The GPU benchmarks in one call on a lent GPU machine (no package index there: liger-kernel travels as a
# wheel in .whl/, see bench/README or the device notes). Writes logs and JSON to $OUT (or ./gpu-out).
set -u
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=$PWD:/tmp/site
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
timeout ${DISTILL_TIMEOUT:-240} python3 bench/distill_gpu.py --steps ${STEPS:-6} ${DISTILL_ROWS:+--rows $DISTILL_ROWS} \
  > "$OUT/distill_gpu.json" 2> "$OUT/distill_gpu.log"; echo "distill_gpu rc=$?"
tail -n 25 "$OUT/distill_gpu.log"; tail -c 3000 "$OUT/distill_gpu.json"; echo
timeout ${OBS_TIMEOUT:-240} python3 bench/obs_vs_reference.py --device cuda > "$OUT/obs_vs_reference.log" 2>&1
echo "obs_vs_reference rc=$?"; tail -n 12 "$OUT/obs_vs_reference.log"
