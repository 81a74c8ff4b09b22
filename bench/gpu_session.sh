#!/usr/bin/env bash
# One device session: every GPU test, the command line's selftest and demo on the GPU, the
# compiler's report on the attention kernel, then the attention benchmark, the alternating dense
# rounds and steps against cuDNN (paired.py --pairs), the ratio to cuDNN by calls in a row
# (run_length.py), the pipeline's overhead in rounds and steps (paired.py --pipeline --pairs) and
# the radial benchmark.
# Logs go to $OUT/logs, tables to $OUT/results, both packed into $OUT/session.tar.gz at the end.
#   BENCH_ARGS="--shapes 32768:128:0" SKIP_INFO=1 bash bench/gpu_session.sh
# The whole GPU suite takes about 10 minutes on an H200 (tests/test_kernels_*.py most of it:
# 6.6 minutes, and more than 8.7 on a fresh machine; its random-case test alone took 4 minutes
# with an empty Triton cache, under 1 with it):
# where one command may run less, run it in two parts with TESTS, e.g.
#   TESTS="tests/test_kernels_attention.py tests/test_kernels_prepass.py" SKIP_BENCH=1 \
#     SKIP_PIPELINE=1 SKIP_RADIAL=1 SKIP_INFO=1 bash bench/gpu_session.sh
#   TESTS="$(ls tests/test_*.py | grep -v test_kernels_)" bash bench/gpu_session.sh
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/sparge_gpu}
LOGS=$OUT/logs
mkdir -p "$LOGS" "$OUT/results"
pack() { tar czf "$OUT/session.tar.gz" -C "$OUT" logs results && rm -rf "$LOGS" "$OUT/results"; }
trap pack EXIT

python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, \
torch.cuda.get_device_name(), torch.cuda.get_device_capability())" | tee "$LOGS/versions.log"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu \
  --format=csv,noheader | tee -a "$LOGS/versions.log"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  # shellcheck disable=SC2086
  SPARGE_AUTOTUNE=0 timeout "${TEST_TIMEOUT:-900}" python3 -m pytest -q -m gpu -rs \
    -p no:cacheprovider ${TESTS:-tests/} 2>&1 | tee "$LOGS/gpu_tests.log" | tail -n 25
  timeout 45 python3 -m sparge selftest 2>&1 | tee "$LOGS/selftest.log" | tail -n 4
  timeout 60 python3 -m sparge demo 2>&1 | tee "$LOGS/demo.log" | tail -n 10
fi
if [ "${SKIP_INFO:-0}" != 1 ]; then
  timeout 120 python3 bench/kernel_info.py --out "$LOGS/asm" 2>&1 | tee "$LOGS/kernel_info.log" \
    | tail -n 20
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  # shellcheck disable=SC2086
  timeout "${BENCH_TIMEOUT:-220}" python3 bench/bench_attention.py ${BENCH_ARGS:-} \
    --out "$OUT/results" 2>&1 | tee "$LOGS/bench.log" | grep -v "^|" | tail -n 30
  timeout "${PAIRED_TIMEOUT:-180}" python3 bench/paired.py --pairs 60 --out "$OUT/results/paired.md" \
    2>&1 | tee "$LOGS/paired.log" | grep -v "^|" | tail -n 12
  timeout "${RUN_LENGTH_TIMEOUT:-200}" python3 bench/run_length.py --runs 1,48 \
    --clocks "$LOGS/run-length-clocks.log" --out "$OUT/results/run-length.md" 2>&1 \
    | tee "$LOGS/run-length.log" | tail -n 12
fi
if [ "${SKIP_PIPELINE:-0}" != 1 ]; then
  timeout "${PIPELINE_TIMEOUT:-300}" python3 bench/paired.py --pipeline --rounds 3 --pairs 120 \
    --shapes 32768:128:0,32768:128:1,32768:64:0,32768:64:1 --out "$OUT/results/paired-pipeline.md" \
    2>&1 | tee "$LOGS/paired-pipeline.log" | tail -n 30
fi
if [ "${SKIP_RADIAL:-0}" != 1 ]; then
  timeout "${RADIAL_TIMEOUT:-60}" python3 bench/bench_radial.py --out "$OUT/results" 2>&1 \
    | tee "$LOGS/radial.log" | tail -n 12
fi
