#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU where torch, pytest and nvcc are preinstalled
# and nothing can be downloaded: builds the extension in place (CUDA kernels included), runs the
# CUDA tests, the GPU benchmarks (dense, observed entries, implicit), the CPU kernels' thread
# scaling and then the rest of the test suite. Logs and result tables go to OUTDIR (9 files).
# Each step has its own timeout, cut to what is left of an overall budget
# (MF_EXT_GPU_CHECK_BUDGET_S, default 470 s), so the whole check ends within 8 minutes and fits
# one device call. The most valuable steps come first;
# the CPU suite, last, gets the time that is left (and pytest-xdist workers where installed).
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
BUDGET="${MF_EXT_GPU_CHECK_BUDGET_S:-470}"

step() { echo "== [$((SECONDS - start))s] $*" | tee -a "$OUT/summary.txt"; }
# The step's own limit, or what is left of the budget if that is less (at least 1 s).
limit() {
  local left=$((BUDGET - (SECONDS - start)))
  [ "$left" -lt "$1" ] && echo $((left > 1 ? left : 1)) || echo "$1"
}

step "environment"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  nvcc --version | tail -n 2 || true
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| CUDA', torch.version.cuda, '| GPU', torch.cuda.is_available() and torch.cuda.get_device_name())"
  date -u
} 2>&1 | tee "$OUT/env.txt"

step "build: $PY setup.py build_ext --inplace (MAX_JOBS=$MAX_JOBS)"
if ! timeout "$(limit 150)" "$PY" setup.py build_ext --inplace 2>&1 | tee "$OUT/build.log"; then
  step "build FAILED (see build.log)"
  exit 1
fi
grep -h "mf_ext setup:" "$OUT/build.log" | tee -a "$OUT/summary.txt"
"$PY" -m mf_ext info 2>&1 | tee -a "$OUT/env.txt"

workers=""
"$PY" -c "import xdist" 2>/dev/null && workers="-n 8"  # the suite is xdist-safe (tmp_path only)

# No -x: every CUDA failure is worth seeing in one run. -m gpu: every test of the cuda backend
# and every CUDA-only test (tests/conftest.py marks them).
step "CUDA tests: pytest -q -m gpu tests"
timeout "$(limit 200)" "$PY" -m pytest -q -p no:cacheprovider $workers -m gpu tests 2>&1 | tee "$OUT/pytest.log"
cuda_rc=$?
tail -n 1 "$OUT/pytest.log" | tee -a "$OUT/summary.txt"

# The benchmarks run even when a test failed, so a failure does not hide the timings.
step "benchmark: benchmarks/bench_dense_cuda.py"
timeout "$(limit 75)" "$PY" benchmarks/bench_dense_cuda.py --out "$OUT/bench_dense_cuda.md" 2>&1 | tee "$OUT/bench.log"
dense_rc=$?

step "benchmark: benchmarks/bench_observed_cuda.py"
timeout "$(limit 90)" "$PY" benchmarks/bench_observed_cuda.py --out "$OUT/bench_observed_cuda.md" 2>&1 | tee -a "$OUT/bench.log"
observed_rc=$?

step "benchmark: benchmarks/bench_implicit_op.py --device cuda"
timeout "$(limit 60)" "$PY" benchmarks/bench_implicit_op.py --device cuda --ranks 64 128 2>&1 | tee "$OUT/bench_implicit_cuda.md"
implicit_rc=${PIPESTATUS[0]}

# Issue 12 §2: the CPU kernels' thread scaling, which the 2-core CI machines cannot show.
step "benchmark: benchmarks/bench_cpu_scaling.py (threads 1 .. cores)"
timeout "$(limit 60)" "$PY" benchmarks/bench_cpu_scaling.py --out "$OUT/cpu_scaling.md" 2>&1 | tee -a "$OUT/bench.log"
scaling_rc=${PIPESTATUS[0]}

# CI runs these on every change; here they check the GPU machine's other torch version.
step "the rest of the suite (CPU tests) on this machine's torch"
timeout "$(limit 600)" "$PY" -m pytest -q -p no:cacheprovider $workers -m "not gpu" tests 2>&1 \
  | tail -n 40 >> "$OUT/pytest.log"
cpu_rc=${PIPESTATUS[0]}
tail -n 1 "$OUT/pytest.log" | tee -a "$OUT/summary.txt"

step "done: CUDA tests rc=$cuda_rc, dense benchmark rc=$dense_rc, observed benchmark rc=$observed_rc, implicit benchmark rc=$implicit_rc, CPU scaling rc=$scaling_rc, CPU tests rc=$cpu_rc"
[ "$cuda_rc" -eq 0 ] && [ "$dense_rc" -eq 0 ] && [ "$observed_rc" -eq 0 ] && [ "$implicit_rc" -eq 0 ] && [ "$scaling_rc" -eq 0 ] && [ "$cpu_rc" -eq 0 ]
