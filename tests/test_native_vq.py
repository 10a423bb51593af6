"""Native VQ kernels (csrc/qg_vq_*.c) against a float64 reference, on every ISA path this CPU has."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from qgguf import gguf_types, native
from qgguf.errors import QggufError
from qgguf.gguf_types import vq as V

pytestmark = pytest.mark.skipif(not native.available(), reason="native module not built")

CSRC = Path(__file__).resolve().parents[1] / "src" / "qgguf" / "native" / "csrc"

# (type, R, C): every vector length, SIMD-specialised and generic index widths, residual, outliers, groups
CASES = [("vq-v8-k256", 64, 96), ("vq-v8-k4096-256-o2-g3", 128, 200), ("vq-v16-k1024-16", 96, 72),
         ("vq-v4-k64-o5", 40, 52), ("vq-v2-k32-8-g2", 18, 30), ("vq-v8-k32-128", 72, 64),
         ("vq-v8-k65536", 16, 40), ("vq-v16-k8192-2048-o1-g2", 32, 130), ("vq-v4-k128-4096", 12, 24),
         ("vq-v8-k4-2", 8, 9),
         # the AVX-512 register-table kernel (k, kr <= 128): full 16-position steps, segment tails, the stream end
         ("vq-v4-k16-16-o2-g8", 64, 300), ("vq-v16-k32-o3", 32, 100), ("vq-v8-k16-4-g3", 24, 77),
         ("vq-v2-k8-32-o4-g5", 14, 181), ("vq-v4-k32-16-g2", 20, 16),
         ("vq-v4-k128-32-o2-g4", 24, 170), ("vq-v2-k64-o3", 10, 140), ("vq-v4-k64-128-g3", 16, 97),
         # the AVX-512 4-bit kernel (k = 16, kr = 16 or none): lane-ordered blocks, odd and even nibble offsets,
         # segments shorter than a block, partial blocks read from the tail table or (at the stream's end) in order
         ("vq-v4-k16-16-o2-g8", 256, 530), ("vq-v2-k16-16-o3-g5", 18, 181), ("vq-v8-k16-16-g4", 64, 64),
         ("vq-v16-k16-16-o2-g3", 48, 150), ("vq-v4-k16-o1-g7", 40, 100), ("vq-v8-k16-o4", 24, 333),
         # byte indices with a byte residual (VPTQ's 2-bit layout): eight positions per step, the group tails
         ("vq-v8-k256-256-o2-g3", 64, 150), ("vq-v16-k256-256-g2", 32, 77),
         # ... and the AVX2 one (k, kr <= 16; 8 positions per step)
         ("vq-v4-k8-8-o3", 16, 203), ("vq-v16-k16-o1-g2", 48, 90)]


def make(name, R, C, seed=0):
    qt = gguf_types.get(name)
    f = qt.random_fields((R, C), np.random.default_rng(seed))
    comp = qt.pack(f)
    L = qt.layout((R, C))
    t = native.VQTensor(comp[V.VQ_IDX], comp[V.VQ_BOOKS], comp[V.VQ_PERM], comp[V.VQ_COLSCALE],
                        comp[V.VQ_COLBIAS], v=qt.v, k=qt.k, R=R, C=C, ridx=comp.get(V.VQ_RIDX),
                        rbooks=comp.get(V.VQ_RBOOKS), kr=qt.kr, obook=comp.get(V.VQ_OBOOK), n_out=L["n_out"],
                        groups=qt.groups)
    return qt, f, comp, t


def reference_f64(qt, f, R, C) -> np.ndarray:
    """The weight in float64 by an explicit loop over the format's definition (docs/FORMAT.md)."""
    L = qt.layout((R, C))
    v, n_out = qt.v, L["n_out"]
    W = np.zeros((R, C))
    for b in range(R // v):
        for p in range(C):
            if p < n_out:
                q = np.asarray(f["obook"], np.float64)[f["idx"][b, p]]
            else:
                g = (p - n_out) // L["gs"]
                q = np.asarray(f["books"], np.float64)[g, f["idx"][b, p]]
                if qt.kr:
                    q = q + np.asarray(f["rbooks"], np.float64)[g, f["ridx"][b, p - n_out]]
            W[b * v:(b + 1) * v, f["perm"][p]] = q * float(f["colscale"][p]) + float(f["colbias"][p])
    return W


@pytest.mark.parametrize("isa", native.isas() if native.available() else [])
@pytest.mark.parametrize("name,R,C", CASES)
def test_kernels_match_reference(isa, name, R, C):
    qt, f, comp, t = make(name, R, C, seed=R + C)
    ref = reference_f64(qt, f, R, C)
    rng = np.random.default_rng(7)
    x = rng.standard_normal(C).astype(np.float32)
    X = rng.standard_normal((9, C)).astype(np.float32)
    with native.use_isa(isa):
        W = t.dequantize()
        # dequantization is exact: float32 (book + rbook) * scale + bias, as the numpy reader computes it
        assert np.array_equal(W, qt.dequantize(np.asarray(comp), (R, C)))
        np.testing.assert_allclose(W, ref, rtol=1e-6, atol=1e-6)
        assert np.array_equal(t.dequantize(3, min(R, 11)), W[3:min(R, 11)])
        for threads in (1, 2):
            y = t.matvec(x, threads=threads)
            yr = ref @ x.astype(np.float64)
            assert np.abs(y - yr).max() <= 2e-5 * (np.abs(ref) @ np.abs(x.astype(np.float64))).max()
            for N in (2, 9):    # the matvec path (N <= 4) and the dequantized-tile path
                Y = t.matmul(X[:N], threads=threads)
                Yr = X[:N].astype(np.float64) @ ref.T
                assert np.abs(Y - Yr).max() <= 2e-5 * (np.abs(X[:N]).astype(np.float64) @ np.abs(ref).T).max()


def test_large_rows_and_threads_agree():
    qt, f, comp, t = make("vq-v8-k4096-256", 1024, 256, seed=3)
    x = np.random.default_rng(1).standard_normal(256).astype(np.float32)
    ys = []
    for isa in native.isas():
        with native.use_isa(isa):
            ys += [t.matvec(x, threads=1), t.matvec(x, threads=2)]
    ref = reference_f64(qt, f, 1024, 256) @ x.astype(np.float64)
    for y in ys:
        assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max()


def test_argument_checks():
    qt, f, comp, t = make("vq-v8-k256-16-o2", 16, 50)
    L = qt.layout((16, 50))
    kw = dict(v=8, k=256, R=16, C=50, ridx=comp[V.VQ_RIDX], rbooks=comp[V.VQ_RBOOKS], kr=16,
              obook=comp[V.VQ_OBOOK], n_out=L["n_out"])
    args = [comp[V.VQ_IDX], comp[V.VQ_BOOKS], comp[V.VQ_PERM], comp[V.VQ_COLSCALE], comp[V.VQ_COLBIAS]]
    native.VQTensor(*args, **kw)
    bad = [
        (0, comp[V.VQ_IDX][:-1], "bytes"),                                  # stream one byte short
        (0, comp[V.VQ_IDX].view(np.int8), "uint8"),
        (1, comp[V.VQ_BOOKS][:, :100], "shape"),
        (2, np.arange(50)[::-1].copy() % 49, "permutation"),
        (2, np.arange(50) + 1, "permutation"),
        (3, np.full(50, np.nan, np.float16), "NaN"),
    ]
    for i, val, msg in bad:
        a = list(args)
        a[i] = val
        with pytest.raises(QggufError, match=msg):
            native.VQTensor(*a, **kw)
    for key, val, msg in (("k", 200, "power"), ("v", 6, "2, 4, 8 or 16"), ("R", 12, "multiple"),
                          ("obook", None, "obook"), ("rbooks", None, "rbooks"), ("n_out", 50, "n_out")):
        with pytest.raises(QggufError, match=msg):
            native.VQTensor(*args, **{**kw, key: val})
    with pytest.raises(QggufError, match="shape"):
        t.matvec(np.zeros(49, np.float32))


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-gcc") is None, reason="no aarch64 cross compiler")
def test_neon_file_compiles(tmp_path):
    """The NEON path cannot run here; it must at least compile for aarch64 with the module's flags."""
    for src in ("qg_vq_neon.c", "qg_vq_scalar.c"):
        r = subprocess.run(["aarch64-linux-gnu-gcc", "-O2", "-std=gnu11", "-ffp-contract=off", "-Wall", "-Werror",
                            "-c", str(CSRC / src), "-I", str(CSRC), "-o", str(tmp_path / (src + ".o"))],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr


NEON_DRIVER = r"""
#include "qg_native.h"
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
static uint64_t rng = 88172645463325252ull;
static uint64_t nxt(void) { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; return rng; }
static float frand(void) { return (float)((nxt() >> 11) * (1.0 / 9007199254740992.0)) * 2.f - 1.f; }
static int run(int v, int kb, int rb, int64_t R, int64_t C, int64_t n_out, int64_t G) {
    const int64_t k = 1 << kb, kr = rb ? 1 << rb : 0, nb = R / v, nc = C - n_out, gs = (nc + G - 1) / G;
    const int64_t ni = (nb * C * kb + 7) / 8 + 3, nr = rb ? (nb * nc * rb + 7) / 8 + 3 : 0;
    uint8_t *idx = malloc(ni), *ridx = malloc(nr + 1);
    for (int64_t i = 0; i < ni; i++) idx[i] = (uint8_t)nxt();
    for (int64_t i = 0; i < nr; i++) ridx[i] = (uint8_t)nxt();
    float *books = malloc(sizeof(float) * G * k * v), *rbooks = malloc(sizeof(float) * (G * kr * v + 1));
    float *obook = malloc(sizeof(float) * k * v), *sc = malloc(sizeof(float) * C), *bi = malloc(sizeof(float) * C);
    int32_t *perm = malloc(sizeof(int32_t) * C);
    for (int64_t i = 0; i < G * k * v; i++) books[i] = frand();
    for (int64_t i = 0; i < G * kr * v; i++) rbooks[i] = 0.3f * frand();
    for (int64_t i = 0; i < k * v; i++) obook[i] = 2.f * frand();
    for (int64_t i = 0; i < C; i++) { sc[i] = 0.05f + 0.01f * frand(); bi[i] = 0.001f * frand(); perm[i] = (int32_t)i; }
    for (int64_t i = C - 1; i > 0; i--) { int64_t j = (int64_t)(nxt() % (uint64_t)(i + 1)); int32_t tmp = perm[i]; perm[i] = perm[j]; perm[j] = tmp; }
    qg_vq_side side = {rb ? rbooks : NULL, n_out ? obook : NULL, perm, bi};
    qg_tensor t;
    memset(&t, 0, sizeof t);
    t.type = QG_TYPE_VQ; t.M = v; t.B = kb; t.g = 1; t.R = R; t.C = C;
    t.codes = idx; t.codebooks = books; t.scales = sc; t.aux0 = rb ? ridx : NULL; t.aux1 = &side;
    t.iparam[0] = k; t.iparam[1] = rb; t.iparam[2] = kr; t.iparam[3] = n_out; t.iparam[4] = G; t.iparam[5] = gs;
    float *x = malloc(sizeof(float) * C), *W0 = malloc(sizeof(float) * R * C), *W1 = malloc(sizeof(float) * R * C);
    float *y0 = malloc(sizeof(float) * R), *y1 = malloc(sizeof(float) * R);
    for (int64_t i = 0; i < C; i++) x[i] = frand();
    int bad = 0;
    if (qg_set_isa(QG_ISA_SCALAR) || qg_dequantize_rows(&t, 0, R, W0, 1) || qg_matvec(&t, x, y0, 1)) bad = 1;
    if (qg_set_isa(QG_ISA_NEON) || qg_dequantize_rows(&t, 0, R, W1, 2) || qg_matvec(&t, x, y1, 2)) bad = 1;
    if (memcmp(W0, W1, sizeof(float) * R * C)) { printf("dequantize differs v=%d kb=%d rb=%d\n", v, kb, rb); bad = 1; }
    double m = 0, d = 0;
    for (int64_t i = 0; i < R; i++) { m = fmax(m, fabs(y0[i])); d = fmax(d, fabs(y0[i] - y1[i])); }
    if (d > 1e-5 * (m + 1)) { printf("matvec differs v=%d kb=%d rb=%d: %g of %g\n", v, kb, rb, d, m); bad = 1; }
    free(idx); free(ridx); free(books); free(rbooks); free(obook); free(sc); free(bi); free(perm);
    free(x); free(W0); free(W1); free(y0); free(y1);
    return bad;
}
int main(void) {
    int bad = 0;
    bad |= run(8, 8, 0, 128, 96, 0, 1);
    bad |= run(8, 12, 8, 64, 130, 3, 3);
    bad |= run(4, 7, 4, 40, 52, 2, 2);
    bad |= run(16, 10, 6, 96, 72, 1, 1);
    bad |= run(2, 5, 3, 18, 30, 0, 2);
    if (!bad) printf("vq neon ok\n");
    return bad;
}
"""


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-gcc") is None or shutil.which("qemu-aarch64") is None,
                    reason="no aarch64 cross compiler / qemu-aarch64")
def test_neon_under_qemu(tmp_path):
    """The NEON path, run under qemu: dequantization identical to the scalar path, matvec within 1e-5."""
    drv = tmp_path / "vq_neon.c"
    drv.write_text(NEON_DRIVER)
    srcs = [str(CSRC / f) for f in ("qg_core.c", "qg_aq_scalar.c", "qg_aq_avx2.c", "qg_aq_avx512.c", "qg_aq_neon.c",
                                    "qg_vq_scalar.c", "qg_vq_avx2.c", "qg_vq_avx512.c", "qg_vq_neon.c")]
    exe = tmp_path / "vq_neon"
    subprocess.run(["aarch64-linux-gnu-gcc", "-O2", "-std=gnu11", "-ffp-contract=off", "-static", f"-I{CSRC}",
                    str(drv), *srcs, "-o", str(exe), "-lpthread", "-lm"], check=True, capture_output=True, text=True)
    out = subprocess.run(["qemu-aarch64", str(exe)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "vq neon ok" in out.stdout
