#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU where torch, pytest and nvcc are preinstalled
# and nothing can be downloaded: builds the extension in place (CUDA kernels included), runs the
# whole test suite (the CUDA tests too) and the GPU benchmarks (dense, then observed entries).
# Logs and the result tables go to OUTDIR. Meant to run in under 8 minutes on an H200 with 16
# cores (each step has its own timeout).
#
#   scripts/gpu_check.sh OUTDIR        (PYTHON=... to pick the interpreter; default python3)
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT="${1:?usage: scripts/gpu_check.sh OUTDIR}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the in-place build, not an installed copy
PY="${PYTHON:-python3}"
export MAX_JOBS="${MAX_JOBS:-16}"  # TORCH_CUDA_ARCH_LIST: setup.py's default (9.0+PTX)
start=$SECONDS

step() { echo "== [$((SECONDS - start))s] $*" | tee -a "$OUT/summary.txt"; }

step "environment"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  nvcc --version | tail -n 2 || true
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| CUDA', torch.version.cuda, '| GPU', torch.cuda.is_available() and torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/env.txt"

step "build: $PY setup.py build_ext --inplace (MAX_JOBS=$MAX_JOBS)"
if ! timeout 150 "$PY" setup.py build_ext --inplace 2>&1 | tee "$OUT/build.log"; then
  step "build FAILED (see build.log)"
  exit 1
fi
grep -h "mf_ext setup:" "$OUT/build.log" | tee -a "$OUT/summary.txt"

step "tests: pytest -x -q tests"
timeout 200 "$PY" -m pytest -x -q tests 2>&1 | tee "$OUT/pytest.log"
tests_rc=$?
tail -n 1 "$OUT/pytest.log" | tee -a "$OUT/summary.txt"

# The benchmarks run even when a test failed, so a failure does not hide the timings.
step "benchmark: benchmarks/bench_dense_cuda.py"
timeout 120 "$PY" benchmarks/bench_dense_cuda.py --out "$OUT/bench_dense_cuda.md" 2>&1 | tee "$OUT/bench.log"
bench_rc=$?

step "benchmark: benchmarks/bench_observed_cuda.py"
timeout 150 "$PY" benchmarks/bench_observed_cuda.py --out "$OUT/bench_observed_cuda.md" 2>&1 | tee "$OUT/bench_observed.log"
bench_observed_rc=$?

step "done: tests rc=$tests_rc, benchmarks rc=$bench_rc (dense), $bench_observed_rc (observed)"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$bench_observed_rc" -eq 0 ]
