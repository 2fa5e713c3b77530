#!/usr/bin/env bash
# The GPU benchmarks in one call on a lent GPU machine (no package index there: liger-kernel travels as a
# wheel in .whl/, see bench/README or the device notes). Writes logs and JSON to $OUT (or ./gpu-out).
# Order: the 2:4 sweep (#3's open bar), the distillation rows (each row's JSON is rewritten as it finishes),
# then unstructured, so a run cut short loses the least. SKIP_OBS=1 runs the distillation rows only; PROFILE_ROWS
# (comma-separated) profiles those rows for 3 more steps (GPU busy fraction, idle gaps, top kernels).
set -u
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=$PWD:/tmp/site
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,power.limit --format=csv | tee "$OUT/gpu.txt"
# SM clock and power once a second for the whole call: ours' distillation steps wandered ±10% where naive's did
# not (2026-11-28); a power-capped clock would show here.
nvidia-smi dmon -s pc -d 1 > "$OUT/dmon.txt" 2>&1 &
DMON=$!
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
if [ "${SKIP_OBS:-0}" != 1 ]; then
  timeout ${OBS_TIMEOUT:-150} python3 bench/obs_vs_reference.py --device cuda --patterns 2:4 ${OBS_ARGS---paired} > "$OUT/obs_2_4.log" 2>&1
  echo "obs 2:4 rc=$?"; tail -n 4 "$OUT/obs_2_4.log"
fi
timeout ${DISTILL_TIMEOUT:-240} python3 bench/distill_gpu.py --steps ${STEPS:-20} ${DISTILL_ROWS:+--rows $DISTILL_ROWS} \
  ${PROFILE_ROWS:+--profile-rows $PROFILE_ROWS} --out "$OUT/distill_gpu.json" > "$OUT/distill_gpu.stdout" 2> "$OUT/distill_gpu.log"
echo "distill_gpu rc=$?"
grep -v Warning "$OUT/distill_gpu.log" | tail -n 30; echo
if [ "${SKIP_UNSTRUCTURED:-0}" != 1 ] && [ "${SKIP_OBS:-0}" != 1 ]; then
  timeout ${OBS_U_TIMEOUT:-100} python3 bench/obs_vs_reference.py --device cuda --patterns unstructured ${OBS_ARGS---paired} > "$OUT/obs_unstructured.log" 2>&1
  echo "obs unstructured rc=$?"; tail -n 3 "$OUT/obs_unstructured.log"
fi
kill $DMON 2>/dev/null
