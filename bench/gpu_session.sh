#!/usr/bin/env bash
# One device session: GPU tests of the attention kernel, the compiler's report on it, then the
# benchmark. Logs and tables go under $OUT (default /tmp/sparge_gpu).
#   BENCH_ARGS="--shapes 32768:128:0" bash bench/gpu_session.sh
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/sparge_gpu}
mkdir -p "$OUT/asm" "$OUT/results"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, \
torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu \
  --format=csv,noheader
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  SPARGE_AUTOTUNE=0 timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -m gpu -rs \
    tests/test_kernels_attention.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -n 25
fi
if [ "${SKIP_INFO:-0}" != 1 ]; then
  timeout 180 python3 bench/kernel_info.py --out "$OUT/asm" 2>&1 | tail -n 30
  tar czf "$OUT/asm.tar.gz" -C "$OUT" asm && rm -rf "$OUT/asm"
fi
# shellcheck disable=SC2086
timeout "${BENCH_TIMEOUT:-420}" python3 bench/bench_attention.py ${BENCH_ARGS:-} \
  --out "$OUT/results" 2>&1 | tee "$OUT/bench.log" | grep -v "^|" | tail -n 80
tail -n 60 "$OUT/results/"*-*.md 2>/dev/null | grep "^|" | head -n 0
