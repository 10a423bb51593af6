"""qgguf.native AQ kernels: every ISA path this CPU runs (and scalar) against float64 numpy."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from _shared import aq_tol
from qgguf import native
from qgguf.errors import QggufError

CONFIGS = [(1, 16, 8), (2, 8, 8), (1, 8, 8), (4, 8, 8), (2, 8, 16), (6, 8, 16), (1, 8, 4), (2, 8, 4)]  # (M, B, g)
SHAPES = [(100, 80), (576, 256), (1536 + 8, 1008)]                 # (R, C): odd R, C % 64 != 0


def test_available():
    assert native.available(), native.build_error()
    assert native.isa() in native.isas()
    assert "scalar" in native.isas()


pytestmark_native = pytest.mark.skipif(not native.available(), reason="native module not built")


def make(M, B, g, R, C, seed=0, scale_dtype=np.float32):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 1 << B, (C // g, M, R), dtype=np.uint8 if B == 8 else np.uint16)
    cb = (rng.standard_normal((M, 1 << B, g)) * 0.05).astype(np.float16)
    s = (rng.random(R) + 0.5).astype(scale_dtype)
    return codes, cb, s


def ref_dequant(codes, cb, s):
    """float32, in the defined order: acc = cb[0][c0]; acc += cb[m][cm]...; acc * s[r]."""
    J, M, R = codes.shape
    g = cb.shape[2]
    cb32 = cb.astype(np.float32)
    acc = cb32[0][codes[:, 0, :]]                      # [J, R, g]
    for m in range(1, M):
        acc = acc + cb32[m][codes[:, m, :]]
    W = acc.transpose(1, 0, 2).reshape(R, J * g)
    return W * s.astype(np.float32)[:, None]


def relerr(y, ref):
    return float(np.linalg.norm(y.astype(np.float64) - ref) / np.linalg.norm(ref))


@pytestmark_native
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c[0]}x{c[1]}-g{c[2]}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_paths_against_reference(cfg, shape):
    M, B, g = cfg
    R, C = shape
    codes, cb, s = make(M, B, g, R, C, seed=R + C + M + B + g)
    t = native.AQTensor(codes, cb, s, M, B, g, R, C)
    Wref = ref_dequant(codes, cb, s)
    W64 = Wref.astype(np.float64)
    rng = np.random.default_rng(1)
    x = rng.standard_normal(C).astype(np.float32)
    x[rng.integers(0, C, 3)] *= 30.0  # a few outlier channels, like real activations
    X = rng.standard_normal((9, C)).astype(np.float32)
    y64 = W64 @ x.astype(np.float64)
    Y64 = X.astype(np.float64) @ W64.T
    for isa in native.isas():
        with native.use_isa(isa):
            for threads in (1, 2):
                W = t.dequantize(threads=threads)
                assert W.dtype == np.float32 and W.shape == (R, C)
                np.testing.assert_array_equal(W, Wref, err_msg=f"{isa} t{threads}")
                np.testing.assert_array_equal(t.dequantize(R // 3, R // 2 + 1, threads=threads),
                                              Wref[R // 3:R // 2 + 1])
                y = t.matvec(x, threads=threads)
                assert y.dtype == np.float32 and y.shape == (R,)
                assert relerr(y, y64) < aq_tol(1, B), (isa, threads, relerr(y, y64))
                for n in (1, 3, 9):  # the per-token LUT path (n <= matmul_lut_max) and tiles
                    Y = t.matmul(X[:n], threads=threads)
                    assert Y.shape == (n, R)
                    assert relerr(Y, Y64[:n]) < aq_tol(n, B), (isa, threads, n, relerr(Y, Y64[:n]))
                np.testing.assert_array_equal(t.matmul(x[None], threads=threads)[0], y)  # one token: one kernel
    if B == 8:  # without the block-major copy of the codes (the stored [J][M][R] layout): the same sums
        tp = native.AQTensor(codes, cb, s, M, B, g, R, C, tiled=False)
        for isa in native.isas():
            with native.use_isa(isa):
                np.testing.assert_array_equal(tp.matvec(x, threads=2), t.matvec(x, threads=2), err_msg=isa)
                np.testing.assert_array_equal(tp.matmul(X[:3], threads=2), t.matmul(X[:3], threads=2))


@pytestmark_native
def test_matvec_error_well_below_quantization_error():
    """The default path's error on y is small next to a 2-bit quantization error (~1e-1), for inputs with uneven
    channel scales too: the 8-bit tables of the AVX-512 decoding path take a step per table (an integer
    multiple of the tile's), so a large channel coarsens its own group's tables only.  With one step per tile
    of 16 groups these inputs gave 1.6e-2 .. 2.3e-2."""
    R, C = 512, 2048
    codes, cb, s = make(2, 8, 8, R, C, seed=5)
    t = native.AQTensor(codes, cb, s, 2, 8, 8, R, C)
    W64 = ref_dequant(codes, cb, s).astype(np.float64)
    rng = np.random.default_rng(2)
    bound = 1e-2 if native.table_bits(1) == 8 else 2e-4
    for _ in range(5):
        x = rng.standard_normal(C).astype(np.float32) * rng.lognormal(0, 1.5, C).astype(np.float32)
        assert relerr(t.matvec(x, threads=2), W64 @ x) < bound
        x = rng.standard_normal(C).astype(np.float32)
        x[rng.integers(0, C, 3)] *= 30.0
        assert relerr(t.matvec(x, threads=2), W64 @ x) < bound


@pytestmark_native
@pytest.mark.skipif(not native.available() or "avx512" not in native.isas(), reason="needs the AVX-512 path")
@pytest.mark.parametrize("bits", ["8", "16", "12"])
def test_table_bits_override(bits):
    """QGGUF_NATIVE_TABLE_BITS picks the AVX-512 tables' precision for every number of tokens (12: ignored)."""
    code = (
        "import sys, numpy as np; sys.path.insert(0, 'tests')\n"
        "from test_native_aq import make, ref_dequant, relerr\n"
        "from qgguf import native\n"
        "native.set_isa('avx512')\n"
        "codes, cb, s = make(2, 8, 8, 300, 512, seed=7)\n"
        "t = native.AQTensor(codes, cb, s, 2, 8, 8, 300, 512)\n"
        "W = ref_dequant(codes, cb, s).astype(np.float64)\n"
        "X = np.random.default_rng(0).standard_normal((4, 512)).astype(np.float32)\n"
        "print(native.table_bits(1), native.table_bits(4), relerr(t.matvec(X[0]), W @ X[0]),"
        " relerr(t.matmul(X), X @ W.T))\n")
    env = {**os.environ, "QGGUF_NATIVE_TABLE_BITS": bits}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    b1, b4, e1, e4 = out.stdout.split()
    want = {"8": (8, 8), "16": (16, 16), "12": (8, 16)}[bits]
    assert (int(b1), int(b4)) == want
    for b, e in ((want[0], float(e1)), (want[1], float(e4))):
        assert (3e-3 < e < 1e-2) if b == 8 else e < 2e-4, (bits, b, e)


@pytestmark_native
def test_input_variants():
    M, B, g, R, C = 2, 8, 8, 70, 64
    codes, cb, s = make(M, B, g, R, C, scale_dtype=np.float16)
    ref = ref_dequant(codes, cb, s)
    t = native.AQTensor(codes.reshape(-1), cb.astype(np.float32), s, M, B, g, R, C)  # flat codes
    np.testing.assert_array_equal(t.dequantize(), ref)
    x = np.random.default_rng(0).standard_normal(C)                                   # float64 x
    y = t.matvec(x)
    assert relerr(y, ref.astype(np.float64) @ x) < aq_tol()
    out = np.empty(R, np.float32)
    assert t.matvec(x.astype(np.float32), out=out) is out
    assert t.matmul(np.zeros((0, C), np.float32)).shape == (0, R)
    assert t.dequantize(5, 5).shape == (0, C)


@pytestmark_native
def test_bad_arguments():
    M, B, g, R, C = 2, 8, 8, 64, 64
    codes, cb, s = make(M, B, g, R, C)
    ok = dict(codes=codes, codebooks=cb, scales=s, M=M, B=B, g=g, R=R, C=C)

    def bad(**kw):
        with pytest.raises(QggufError):
            native.AQTensor(**{**ok, **kw})

    bad(codes=codes.astype(np.uint16))            # wrong code dtype for B=8
    bad(codes=codes[:, :, :32])                    # wrong shape
    bad(codes=np.asfortranarray(codes))            # not C-contiguous
    bad(codes=codes.tolist())                      # not an array
    bad(B=12)
    bad(B=16)                                      # codes/codebooks do not match B=16
    bad(g=7)
    bad(C=60)                                      # g does not divide C
    bad(M=0)
    bad(M=1.5)
    bad(R=True)
    bad(R=0)
    bad(R=1 << 45)
    bad(codebooks=cb.astype(np.float64))
    bad(codebooks=cb[:, :128])
    nan_cb = cb.copy(); nan_cb[0, 0, 0] = np.nan
    bad(codebooks=nan_cb)
    bad(scales=s[:10])
    bad(scales=s.astype(np.int32))
    inf_s = s.copy(); inf_s[3] = np.inf
    bad(scales=inf_s)
    t = native.AQTensor(**ok)
    x = np.zeros(C, np.float32)
    for call in (lambda: t.matvec(np.zeros(C + 1, np.float32)),
                 lambda: t.matvec(np.zeros(C, np.int32)),
                 lambda: t.matvec(x, threads=0),
                 lambda: t.matvec(x, threads=True),
                 lambda: t.matvec(x, threads=1000),
                 lambda: t.matvec(x, out=np.zeros(R, np.float64)),
                 lambda: t.matvec(x, out=np.zeros(R + 1, np.float32)),
                 lambda: t.matmul(x),
                 lambda: t.matmul(np.zeros((2, C + 8), np.float32)),
                 lambda: t.dequantize(10, 5),
                 lambda: t.dequantize(0, R + 1),
                 lambda: t.dequantize(-1, 5),
                 lambda: native.set_isa("sse9"),
                 ):
        with pytest.raises(QggufError):
            call()


@pytestmark_native
def test_env_isa_override():
    code = "from qgguf import native; print(native.isa())"
    env = {**os.environ, "QGGUF_NATIVE_ISA": "scalar"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "scalar"
    env["QGGUF_NATIVE_ISA"] = "nonsense"
    code = ("from qgguf import native\nfrom qgguf.errors import QggufError\n"
            "try:\n    native.isa()\nexcept QggufError as e:\n    print('error', e)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.startswith("error") and "QGGUF_NATIVE_ISA" in out.stdout, out


# ---------------------------------------------------------------- NEON under qemu
CSRC = Path(native.__file__).parent / "csrc"
NEON_DRIVER = CSRC / "qg_selftest.c"


@pytest.mark.skipif(not (shutil.which("aarch64-linux-gnu-gcc") and shutil.which("qemu-aarch64")),
                    reason="needs aarch64-linux-gnu-gcc and qemu-aarch64")
def test_neon_under_qemu(tmp_path):
    exe = tmp_path / "neon_driver"
    srcs = [str(CSRC / f) for f in ("qg_core.c", "qg_aq_scalar.c", "qg_aq_avx2.c",
                                    "qg_aq_avx512.c", "qg_aq_neon.c", "qg_vq_scalar.c", "qg_vq_avx2.c",
                                    "qg_vq_avx512.c", "qg_vq_neon.c")]
    subprocess.run(["aarch64-linux-gnu-gcc", "-O2", "-std=gnu11", "-ffp-contract=off", "-static",
                    f"-I{CSRC}", str(NEON_DRIVER), *srcs, "-o", str(exe), "-lpthread", "-lm"],
                   check=True, capture_output=True, text=True)
    out = subprocess.run(["qemu-aarch64", str(exe)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "neon ok" in out.stdout
