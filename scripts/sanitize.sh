#!/usr/bin/env bash
# Builds the CPU kernels with AddressSanitizer + UBSan into a copy of the tree
# (build/sanitize/src: the normal in-place build is untouched), runs the op tests with that
# build, then a leak check over repeated op calls. See docs/hardening.md.
#
#   scripts/sanitize.sh [pytest args]     default: the op tests on the cpu backend
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY="$ROOT/.venv/bin/python"
COPY="$ROOT/build/sanitize/src"

mkdir -p "$COPY"
# Sources only; the copy keeps its own objects between runs (ninja rebuilds what changed).
tar -C "$ROOT" -cf - setup.py pyproject.toml csrc mf_ext tests | tar -C "$COPY" -xf -
rm -f "$COPY"/mf_ext/_C*.so "$COPY"/mf_ext/_build_info.py
echo "[sanitize] building (CPU only, -fsanitize=address,undefined) in $COPY" >&2
(cd "$COPY" && MF_EXT_CUDA=0 MF_EXT_SANITIZE=1 MAX_JOBS="${MAX_JOBS:-2}" \
  "$PY" setup.py --quiet build_ext --inplace >"$COPY/../build.log" 2>&1) || {
  cat "$COPY/../build.log" >&2; exit 1; }

# Python and torch are not instrumented, so the ASan runtime must be the first library loaded;
# libstdc++ right after it, or ASan cannot find the real __cxa_throw (python itself does not
# link libstdc++) and aborts at the first C++ exception thrown by torch.
ASAN_LIB="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)"
# detect_leaks=0: the interpreter and torch never free much of what they allocate at exit, and
# LSan would report all of it; leaks are checked separately below, by growth over many calls.
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:print_summary=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
run() { (cd "$COPY" && LD_PRELOAD="$ASAN_LIB" PYTHONPATH="$COPY" "$PY" "$@"); }

run -c "import mf_ext._build_info as b; assert b.SANITIZE, 'not the sanitizer build'"
echo "[sanitize] op tests under ASan + UBSan" >&2
if [ $# -eq 0 ]; then
  # -k: the emulated backend's library is not instrumented (and is checked by its own tests)
  set -- tests/test_masked_mf_loss.py tests/test_observed_mf_loss.py tests/test_partition.py \
    tests/test_property_parity.py tests/test_threads.py -q -p no:cacheprovider -k "not emulated"
fi
run -m pytest "$@"

# Leak check: LSan on, many calls of each op; any leak whose allocation stack passes through
# mf_ext's own code fails, and the total leaked must not grow with the number of calls.
echo "[sanitize] leak check (LSan) over repeated op calls" >&2
leaks() {
  ASAN_OPTIONS="detect_leaks=1:fast_unwind_on_malloc=0:malloc_context_size=40" \
    run "$ROOT/scripts/leak_driver.py" "$1" 2>&1 | tee "$COPY/../leaks-$1.log" >/dev/null || true
  sed -n 's/^SUMMARY: AddressSanitizer: \([0-9]*\) byte.*/\1/p' "$COPY/../leaks-$1.log" | tail -1
}
few=$(leaks 10); many=$(leaks 2000)
echo "[sanitize] leaked at exit: ${few:-0} bytes after 10 calls, ${many:-0} after 2000" >&2
if grep -q "mf_ext::" "$COPY/../leaks-2000.log"; then
  grep -B2 -A30 "mf_ext::" "$COPY/../leaks-2000.log" | head -60 >&2
  echo "[sanitize] FAIL: a leak allocated in mf_ext's code" >&2; exit 1
fi
if [ $(( ${many:-0} - ${few:-0} )) -gt 65536 ]; then
  echo "[sanitize] FAIL: leaks grow with the number of calls" >&2; exit 1
fi
echo "[sanitize] clean" >&2
