"""cffi (API mode) build script of qgguf's native kernels: ``qgguf.native._qgguf_native``.

Used by setup.py (``cffi_modules=["src/qgguf/native/_build.py:ffibuilder"]``), so both
``pip install .`` and ``pip install -e .`` compile it.  Every ISA file is compiled with the same
global flags; each one switches its own target ISA with a pragma (csrc/qg_target_begin.h), and
the core picks a path at run time by CPU feature detection, so one binary runs on every CPU.

For development, ``python src/qgguf/native/_build.py`` builds the module in place;
``python src/qgguf/native/_build.py --sanitize DIR`` builds it with ASan + UBSan into DIR (``make sanitize``).
"""
from __future__ import annotations

import os
import sys

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "csrc")
SOURCES = ["qg_core.c", "qg_aq_scalar.c", "qg_aq_avx2.c", "qg_aq_avx512.c", "qg_aq_neon.c",
           "qg_vq_scalar.c", "qg_vq_avx2.c", "qg_vq_avx512.c", "qg_vq_neon.c"]
HEADERS = ["qg_native.h", "qg_target_begin.h", "qg_target_end.h"]

CDEF = """
typedef struct qg_tensor {
    int32_t type;
    int32_t M;
    int32_t B;
    int32_t g;
    int64_t R;
    int64_t C;
    const void *codes;
    const float *codebooks;
    const float *cbT;
    const float *scales;
    const void *codes_tiled;
    const void *aux0;
    const void *aux1;
    int64_t iparam[8];
} qg_tensor;

typedef struct qg_vq_side {
    const float *rbooks;
    const float *obook;
    const int32_t *perm;
    const float *colbias;
} qg_vq_side;

int qg_isa_available(int isa);
int qg_best_isa(void);
int qg_get_isa(void);
int qg_set_isa(int isa);
const char *qg_isa_name(int isa);
int qg_has_kernel(int type, int isa);
int qg_dequantize_rows(const qg_tensor *t, int64_t r0, int64_t r1, float *out, int nthreads);
int qg_matvec(const qg_tensor *t, const float *x, float *y, int nthreads);
int qg_matmul(const qg_tensor *t, const float *X, int64_t N, float *Y, int nthreads);
int qg_matvec_multi(const qg_tensor **ts, int n, const float *x, float **ys, int nthreads);
int qg_dense_matvec(const float *W, int64_t R, int64_t C, const float *x, float *y, int nthreads);
int qg_decode_attn(float *qk, const float *v, const float *cosv, const float *sinv, float *Kc, float *Vc,
                   float *a, int H, int Hkv, int dk, int dv, int64_t pos, int64_t cap, float scale, int round16,
                   int nthreads);
int qg_matmul_lut_max(void);
int qg_table_bits(void);
int qg_aq_table_bits(int B, int64_t N);
const char *qg_last_error(void);
"""


def _rel(path: str) -> str:
    # setuptools wants source paths relative to the setup.py folder (the current directory)
    try:
        return os.path.relpath(path)
    except ValueError:  # another drive on Windows
        return path


def _compile_args() -> list[str]:
    if sys.platform == "win32" and "GCC" not in sys.version:
        return ["/O2"]
    return ["-O3", "-std=gnu11", "-ffp-contract=off", "-fno-math-errno", "-Wall",
            "-Wno-unused-function", "-Wno-unknown-pragmas"]


#: ``make sanitize`` (tools/sanitize.sh): AddressSanitizer + UndefinedBehaviorSanitizer, first finding fatal
SANITIZE_FLAGS = ["-O1", "-g", "-fsanitize=address,undefined", "-fno-omit-frame-pointer",
                  "-fno-sanitize-recover=all"]


def make_ffibuilder(extra_compile_args=(), extra_link_args=(), path=_rel) -> FFI:
    """The module's builder: every file of SOURCES, the global flags plus ``extra_compile_args``;
    ``path`` maps the absolute source paths (setup.py: relative ones)."""
    b = FFI()
    b.cdef(CDEF)
    b.set_source(
        "qgguf.native._qgguf_native",
        '#include "qg_native.h"\n',
        sources=[path(os.path.join(CSRC, s)) for s in SOURCES],
        include_dirs=[path(CSRC)],
        depends=[path(os.path.join(CSRC, h)) for h in HEADERS],
        extra_compile_args=_compile_args() + list(extra_compile_args),
        extra_link_args=list(extra_link_args),
        libraries=[] if sys.platform == "win32" else ["pthread", "m"],
    )
    return b


ffibuilder = make_ffibuilder()


def build_sanitized(outdir: str) -> str:
    """Build the module with SANITIZE_FLAGS into ``outdir`` (not into the package); returns the .so path.
    Load it with QGGUF_NATIVE_MODULE_DIR=outdir and the sanitizer runtime preloaded (tools/sanitize.sh)."""
    unlisted = sorted(f for f in os.listdir(CSRC) if f.endswith(".c") and f not in SOURCES
                      and f != "qg_selftest.c")
    if unlisted:
        print(f"warning: csrc files not in SOURCES (not built): {', '.join(unlisted)}", file=sys.stderr)
    outdir = os.path.abspath(outdir)
    os.makedirs(outdir, exist_ok=True)
    b = make_ffibuilder(SANITIZE_FLAGS, SANITIZE_FLAGS[2:], path=os.path.abspath)
    return b.compile(tmpdir=outdir, verbose=False)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--sanitize":
        print(build_sanitized(sys.argv[2]))
        sys.exit(0)
    # in-place development build: writes _qgguf_native*.so next to this file
    os.chdir(os.path.dirname(os.path.dirname(HERE)))  # src/
    # a new builder: the module-level one's paths are relative to the directory this was started in
    make_ffibuilder().compile(tmpdir=".", verbose=True)
