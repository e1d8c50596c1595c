#!/usr/bin/env bash
# GPU check for one CUDA machine (written for an H100), bounded to about 8 minutes:
#   1. the CUDA cases of the property tests (the `device` fixture adds cuda when available);
#   2. bench_layer.py, quick grid: float32, then bfloat16 autocast + channels_last;
#   3. bench_models.py, small set: float32 (with the eval_kernel_cache variant), then bfloat16 autocast in both memory formats
#      (contiguous and channels_last interleaved), then torch.compile (CIFAR ResNet-18 only,
#      original vs rewritten).
# Every step has its own time limit and the script goes on after a failure. Results go to
# $OUT if set (as gpu_check.tar.gz plus summary.md, so that few files come back), else to
# benchmarks/results/gpu/.
#
# Usage (from the repository root):  bash benchmarks/gpu_check.sh
set -u

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root" || exit 1
if [ -n "${OUT:-}" ]; then
  work=$(mktemp -d)
else
  work="$root/benchmarks/results/gpu"
fi
mkdir -p "$work"
summary="$work/summary.md"

python=${PYTHON:-python}
if [ -x "$root/.venv/bin/python" ] && [ -z "${PYTHON:-}" ]; then
  python="$root/.venv/bin/python"
fi

started=$(date +%s)
{
  echo "# GPU check ($(date -u '+%Y-%m-%d %H:%M:%S UTC'))"
  echo
  echo '```'
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | head -3
  "$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())" 2>&1
  echo '```'
  echo
  echo "| step | exit | seconds | log |"
  echo "|---|---|---|---|"
} >"$summary"

# step NAME LIMIT_SECONDS COMMAND...: run with a time limit, log to NAME.log, add a summary row.
step() {
  local name=$1 limit=$2
  shift 2
  local t0 rc
  t0=$(date +%s)
  echo "== $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" >"$work/$name.log" 2>&1
  rc=$?
  echo "| $name | $rc$([ "$rc" = 124 ] && echo ' (time limit)') | $(($(date +%s) - t0)) | $name.log |" >>"$summary"
  tail -n 3 "$work/$name.log"
}

export HYPOTHESIS_PROFILE=ci
step tests-cuda 120 "$python" -m pytest tests/test_fast_paths.py tests/test_conv_norm2d.py tests/test_modules.py \
  tests/test_spectrum.py tests/test_eval_kernel_cache.py -q -p no:cacheprovider -k cuda

layer=("$python" benchmarks/bench_layer.py --quick --device cuda --repeats 10 --warmup 3 --out-dir "$work")
step layer-fp32 60 "${layer[@]}"
step layer-bf16-cl 60 "${layer[@]}" --amp --channels-last

models=("$python" benchmarks/bench_models.py --device cuda --models cifar_resnet18,resnet18,mobilenetv3_large_100
  --batch 32 --size 128 --cifar-batch 128 --repeats 10 --warmup 3 --direct --out-dir "$work")
step models-fp32 90 "${models[@]}" --eval-kernel-cache
step models-bf16-layouts 90 "${models[@]}" --amp --layouts contiguous channels_last --no-naive --tag layouts
step models-compile 120 "$python" benchmarks/bench_models.py --device cuda --models cifar_resnet18 --cifar-batch 128 \
  --repeats 10 --warmup 3 --compile --no-naive --out-dir "$work"

{
  echo
  echo "Total: $(($(date +%s) - started)) s"
  for table in "$work"/*.md; do
    [ "$table" = "$summary" ] && continue
    echo
    cat "$table"
  done
} >>"$summary"

if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  cp "$summary" "$OUT/summary.md"
  tar -czf "$OUT/gpu_check.tar.gz" -C "$work" .
  echo "wrote $OUT/summary.md and $OUT/gpu_check.tar.gz"
else
  echo "wrote $work"
fi
