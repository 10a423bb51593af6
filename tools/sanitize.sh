#!/usr/bin/env bash
# `make sanitize`: build qgguf's native C library with AddressSanitizer + UndefinedBehaviorSanitizer
# (-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all, every file _build.py's SOURCES
# lists) into build/sanitize/, then run the kernel tests (tests/test_native*.py) against it once per ISA path
# this CPU has (QGGUF_NATIVE_ISA=scalar|avx2|avx512|neon), with the sanitizer runtime preloaded into python.
# ASan reports go to files under build/sanitize/reports/, UBSan reports to stderr, which is kept uncaptured
# (pytest -s) in build/sanitize/tests-ISA.log; the run fails on any report or test failure. First, two canaries prove the sanitizers are live: a deliberate heap overflow (ASan) and a misaligned
# code pointer (UBSan), both handed straight to the C entry points (bypassing the Python argument checks), must be
# reported.
#   PY=.venv/bin/python tools/sanitize.sh [pytest args...]
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
CC=${CC:-gcc}
OUT=build/sanitize
REPORTS=$OUT/reports
rm -rf "$OUT"
mkdir -p "$REPORTS"

echo "== build (ASan + UBSan) into $OUT"
"$PY" src/qgguf/native/_build.py --sanitize "$OUT" >"$OUT/build.log" 2>&1 || { cat "$OUT/build.log"; exit 1; }
grep -h "warning: csrc" "$OUT/build.log" || true
ASAN_LIB=$($CC -print-file-name=libasan.so)
[ -e "$ASAN_LIB" ] || { echo "no libasan.so for $CC"; exit 1; }
export QGGUF_NATIVE_MODULE_DIR=$OUT
export PYTHONFAULTHANDLER=0
# CPython keeps its interned objects to the end by design: leak checking off
ASAN_BASE="detect_leaks=0:halt_on_error=1:abort_on_error=0:strict_string_checks=1:detect_stack_use_after_return=1"
UBSAN_BASE="print_stacktrace=1:halt_on_error=1"

run() {  # run NAME CMD...: with the sanitizer runtime, reports to $REPORTS/NAME.*
    local name=$1; shift
    LD_PRELOAD=$ASAN_LIB ASAN_OPTIONS="$ASAN_BASE:log_path=$REPORTS/$name.asan" \
        UBSAN_OPTIONS="$UBSAN_BASE:log_path=$REPORTS/$name.ubsan" "$@"
}

echo "== canaries"
CANARY=$(mktemp -d)
cat >"$CANARY/asan.py" <<'EOF'
import numpy as np
from qgguf import native
from qgguf.native import _ffi, _lib
assert "build/sanitize" in native.module_file(), native.module_file()
R, C = 64, 64
codes = np.zeros((C // 8, 2, R), np.uint8)
t = native.AQTensor(codes, np.zeros((2, 256, 8), np.float32), np.ones(R, np.float32), 2, 8, 8, R, C)
small = np.empty(R * C - 1, np.float32)            # one float short
_lib.qg_dequantize_rows(t._t, 0, R, _ffi.cast("float *", _ffi.from_buffer(small)), 1)
print("not caught")
EOF
cat >"$CANARY/ubsan.py" <<'EOF'
import numpy as np
from qgguf import native
from qgguf.native import _ffi, _lib
R, C = 64, 64
native.set_isa("scalar")
buf = np.zeros((C // 8) * R * 2 + 1, np.uint8)
codes = np.zeros((C // 8, 1, R), np.uint16)
t = native.AQTensor(codes, np.zeros((1, 65536, 8), np.float32), np.ones(R, np.float32), 1, 16, 8, R, C)
t._t.codes = _ffi.cast("const void *", _ffi.cast("char *", _ffi.from_buffer(buf)) + 1)  # misaligned uint16 codes
_lib.qg_dequantize_rows(t._t, 0, R, _ffi.cast("float *", _ffi.from_buffer(np.empty(R * C, np.float32))), 1)
print("not caught")
EOF
canary_ok=1
run canary-asan "$PY" "$CANARY/asan.py" >/dev/null 2>&1
if grep -qs "ERROR: AddressSanitizer" "$REPORTS"/canary-asan.asan.*; then
    echo "ASan canary: caught ($(grep -ho 'AddressSanitizer: [a-z-]*' "$REPORTS"/canary-asan.asan.* | head -n 1))"
else echo "ASan canary: NOT caught - the sanitizer is not active"; canary_ok=0; fi
run canary-ubsan "$PY" "$CANARY/ubsan.py" >"$REPORTS/canary-ubsan.log" 2>&1
if grep -qs "runtime error: load of misaligned address" "$REPORTS"/canary-ubsan.log; then
    echo "UBSan canary: caught (runtime error: load of misaligned address)"
else echo "UBSan canary: NOT caught - the sanitizer is not active"; canary_ok=0; fi
rm -rf "$CANARY"
mkdir -p "$REPORTS/canaries"
mv "$REPORTS"/canary-* "$REPORTS/canaries/" 2>/dev/null

ISAS=$(run isas "$PY" -c "from qgguf import native; print(' '.join(native.isas()))")
[ -n "$ISAS" ] || { echo "cannot load the sanitized module"; exit 1; }
TESTS=$(ls tests/test_native*.py)
status=0
for isa in $ISAS; do
    echo "== tests, QGGUF_NATIVE_ISA=$isa: $(echo $TESTS)"
    # (test_neon_under_qemu builds its own static aarch64 binary, not this module: left to `make test`)
    run "tests-$isa" env QGGUF_NATIVE_ISA="$isa" "$PY" -m pytest -q -s -p no:cacheprovider -m "not slow" \
        -k "not neon_under_qemu" $TESTS "$@" \
        >"$OUT/tests-$isa.log" 2>&1
    rc=$?
    tail -n 1 "$OUT/tests-$isa.log"
    if grep -q "runtime error:\|ERROR: AddressSanitizer\|ERROR: LeakSanitizer" "$OUT/tests-$isa.log"; then
        cp "$OUT/tests-$isa.log" "$REPORTS/tests-$isa.stderr-report"
    fi
    [ $rc -eq 0 ] || { status=1; tail -n 30 "$OUT/tests-$isa.log"; }
done
findings=$(ls "$REPORTS" | grep -v '^canaries$' | wc -l)
echo "== sanitizer findings: $findings (reports in $REPORTS)"
if [ "$findings" -ne 0 ]; then
    status=1
    for f in "$REPORTS"/*.asan.* "$REPORTS"/*.ubsan.*; do [ -e "$f" ] && { echo "--- $f"; head -n 40 "$f"; }; done
    grep -h -A 12 "runtime error:\|ERROR: AddressSanitizer" "$REPORTS"/*.stderr-report 2>/dev/null | head -n 60
fi
[ $canary_ok -eq 1 ] || status=1
[ $status -eq 0 ] && echo "sanitize: OK" || echo "sanitize: FAILED"
exit $status
