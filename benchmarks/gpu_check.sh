#!/usr/bin/env bash
# The prepared GPU check of the `triton` backend (issues 6, 11, 12): one call of about ten minutes
# on a CUDA machine that already has torch, triton and pytest. Installs nothing.
#
#   benchmarks/gpu_check.sh            GPU tests, the benchmark table, then a short training run
#   benchmarks/gpu_check.sh tests      tests/test_triton_gpu.py only
#   benchmarks/gpu_check.sh bench      benchmarks/bench_gpu.py only (autotunes: slower first calls)
#   benchmarks/gpu_check.sh train      `selfattn train` on the GPU (issue 7's CUDA path), 200 steps
#   benchmarks/gpu_check.sh ring       ring attention over nccl, one process per GPU (issue 15)
#
# Logs and the benchmark JSON go to $OUT (the device tool's output folder) or /tmp/selfattn_gpu.
# Record each run (card, date, table) in BENCHMARKS.md, section "GPU backend (issue 6)".
set -uo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
PY=${PYTHON:-python3}
DEST=${OUT:-/tmp/selfattn_gpu}
mkdir -p "$DEST"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader || true
"$PY" -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '| cuda', torch.version.cuda, '|', torch.cuda.get_device_name())" || exit 1
date -u +"date: %Y-%m-%d %H:%M UTC"

status=0
if [ "$what" = all ] || [ "$what" = tests ]; then
    echo "== tests/test_triton_gpu.py"
    # the first GPU run compiles one kernel variant per mask switch: allow for it, and report up to 5 failures
    timeout 420 "$PY" -m pytest tests/test_triton_gpu.py -q --maxfail=5 -p no:cacheprovider --durations=8 2>&1 | tee "$DEST/tests.log"
    status=${PIPESTATUS[0]}
fi
if [ "$what" = all ] || [ "$what" = bench ]; then
    echo "== benchmarks/bench_gpu.py"
    timeout 240 "$PY" benchmarks/bench_gpu.py --json "$DEST/bench.json" 2>&1 | tee "$DEST/bench.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi
if [ "$what" = all ] || [ "$what" = train ]; then
    echo "== selfattn train --device cuda (auto backend: triton), 200 steps"
    timeout 60 "$PY" -m selfattn.cli train --device cuda --steps 200 --eval-every 100 --no-progress \
        --out "$DEST/train" 2>&1 | tail -n 15 | tee "$DEST/train.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi
if [ "$what" = all ] || [ "$what" = ring ]; then
    # issue 15: ring attention over nccl, one rank per GPU (one GPU: a one-rank ring, set-up only)
    ngpu=$(nvidia-smi -L 2>/dev/null | wc -l); [ "$ngpu" -ge 1 ] || ngpu=1
    echo "== ring attention over nccl, $ngpu process(es)"
    timeout 120 "$PY" -m torch.distributed.run --standalone --nproc_per_node="$ngpu" benchmarks/ring_nccl_check.py \
        2>&1 | tee "$DEST/ring.log" | grep -E "^ring |Error|error" | head -n 20
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi
echo "== summary"
grep -E "passed|failed|error" "$DEST/tests.log" 2>/dev/null | tail -n 1
grep -E "^\| " "$DEST/bench.log" 2>/dev/null
exit "$status"
