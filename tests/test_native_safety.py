"""Issue 7: the native kernels' Python boundary refuses every bad argument with a QggufError (dtype, byte order,
alignment, contiguity, shapes, group/codebook sizes, thread counts, row ranges, output buffers), the C entry
points refuse bad calls themselves, and odd-but-valid inputs (strided, misaligned, big-endian, read-only) are
copied or read correctly. ``make sanitize`` (tools/sanitize.sh) runs this file and tests/test_native_aq.py under
ASan + UBSan; the last test here runs it (slow)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from _shared import aq_tol
from qgguf import native
from qgguf.errors import QggufError

pytestmark = pytest.mark.skipif(not native.available(), reason="native module not built")

ROOT = Path(__file__).resolve().parents[1]
M, B, G, R, C = 2, 8, 8, 72, 64


def parts(M=M, B=B, g=G, R=R, C=C, seed=0):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 1 << B, (C // g, M, R), dtype=np.uint8 if B == 8 else np.uint16)
    cb = (rng.standard_normal((M, 1 << B, g)) * 0.05).astype(np.float32)
    s = (rng.random(R) + 0.5).astype(np.float32)
    return codes, cb, s


def misaligned(a: np.ndarray) -> np.ndarray:
    """A C-contiguous copy of ``a`` whose data starts one byte past an aligned address."""
    buf = np.zeros(a.nbytes + a.itemsize + 1, np.uint8)
    off = (-buf.ctypes.data) % max(a.itemsize, 8) + 1
    v = np.frombuffer(buf.data, dtype=a.dtype, count=a.size, offset=off).reshape(a.shape)
    v[...] = a
    assert not v.flags.aligned and v.flags.c_contiguous
    return v


CODES, CB, S = parts()
OK = dict(codes=CODES, codebooks=CB, scales=S, M=M, B=B, g=G, R=R, C=C)

BAD_TENSORS = {
    "codes int8": dict(codes=CODES.astype(np.int8)),
    "codes uint16 for B=8": dict(codes=CODES.astype(np.uint16)),
    "codes float": dict(codes=CODES.astype(np.float32)),
    "codes big-endian uint16": dict(B=16, codes=parts(B=16)[0].astype(">u2"), codebooks=parts(B=16)[1]),
    "codes misaligned uint16": dict(B=16, codes=misaligned(parts(B=16)[0]), codebooks=parts(B=16)[1]),
    "codes strided": dict(codes=np.repeat(CODES, 2, axis=2)[:, :, ::2]),
    "codes Fortran order": dict(codes=np.asfortranarray(CODES)),
    "codes shape R": dict(codes=CODES[:, :, :R - 1]),
    "codes shape M": dict(codes=CODES[:, :1]),
    "codes shape J": dict(codes=CODES[:-1]),
    "codes flat too short": dict(codes=CODES.reshape(-1)[:-1]),
    "codes list": dict(codes=CODES.tolist()),
    "codes memoryview": dict(codes=memoryview(CODES)),
    "codebooks M": dict(codebooks=CB[:1]),
    "codebooks 2^B": dict(codebooks=CB[:, :255]),
    "codebooks g": dict(codebooks=CB[:, :, :4]),
    "codebooks float64": dict(codebooks=CB.astype(np.float64)),
    "codebooks int": dict(codebooks=CB.astype(np.int32)),
    "codebooks NaN": dict(codebooks=np.where(np.arange(CB.size).reshape(CB.shape) == 5, np.nan, CB)
                          .astype(np.float32)),
    "codebooks inf": dict(codebooks=np.where(np.arange(CB.size).reshape(CB.shape) == 7, np.inf, CB)
                          .astype(np.float32)),
    "scales R": dict(scales=S[:-1]),
    "scales 2-D": dict(scales=S[:, None]),
    "scales int": dict(scales=S.astype(np.int64)),
    "scales NaN": dict(scales=np.where(np.arange(R) == 3, np.nan, S).astype(np.float32)),
    "M 0": dict(M=0), "M 65": dict(M=65), "M float": dict(M=2.0), "M str": dict(M="2"),
    "B 4": dict(B=4), "B 12": dict(B=12), "B 16 with uint8 codes": dict(B=16), "B bool": dict(B=True),
    "g 0": dict(g=0), "g 4 with codebooks of 8": dict(g=4), "g 32": dict(g=32),
    "C not multiple of g": dict(C=60),
    "C 0": dict(C=0), "R 0": dict(R=0), "R negative": dict(R=-72),
    "R too large": dict(R=1 << 41), "R*C overflow": dict(R=1 << 40, C=1 << 40),
    "R None": dict(R=None),
}


@pytest.mark.parametrize("what", list(BAD_TENSORS))
def test_bad_tensor_arguments(what):
    with pytest.raises(QggufError):
        native.AQTensor(**{**OK, **BAD_TENSORS[what]})


def _t():
    return native.AQTensor(**OK)


def _out_misaligned(shape):
    return misaligned(np.zeros(shape, np.float32))


X1 = np.ones(C, np.float32)
XN = np.ones((3, C), np.float32)
BAD_CALLS = {
    "matvec x short": lambda t: t.matvec(np.zeros(C - 1, np.float32)),
    "matvec x 2-D": lambda t: t.matvec(XN),
    "matvec x int": lambda t: t.matvec(np.zeros(C, np.int32)),
    "matvec x complex": lambda t: t.matvec(np.zeros(C, np.complex64)),
    "matvec x bool": lambda t: t.matvec(np.zeros(C, bool)),
    "matvec x object": lambda t: t.matvec(np.zeros(C, object)),
    "matvec x list": lambda t: t.matvec([0.0] * C),
    "threads 0": lambda t: t.matvec(X1, threads=0),
    "threads 257": lambda t: t.matvec(X1, threads=257),
    "threads negative": lambda t: t.matvec(X1, threads=-1),
    "threads float": lambda t: t.matvec(X1, threads=2.0),
    "threads bool": lambda t: t.matvec(X1, threads=True),
    "out float64": lambda t: t.matvec(X1, out=np.zeros(R, np.float64)),
    "out shape": lambda t: t.matvec(X1, out=np.zeros(R + 1, np.float32)),
    "out read-only": lambda t: t.matvec(X1, out=_readonly(R)),
    "out strided": lambda t: t.matvec(X1, out=np.zeros(2 * R, np.float32)[::2]),
    "out misaligned": lambda t: t.matvec(X1, out=_out_misaligned(R)),
    "out overlaps x": lambda t: _overlap_matvec(t),
    "out overlaps X": lambda t: _overlap_matmul(t),
    "matmul X 1-D": lambda t: t.matmul(X1),
    "matmul X 3-D": lambda t: t.matmul(XN[None]),
    "matmul X columns": lambda t: t.matmul(np.zeros((2, C + 8), np.float32)),
    "matmul out shape": lambda t: t.matmul(XN, out=np.zeros((3, R + 1), np.float32)),
    "matmul out Fortran": lambda t: t.matmul(XN, out=np.asfortranarray(np.zeros((3, R), np.float32))),
    "dequantize r0 > r1": lambda t: t.dequantize(10, 5),
    "dequantize r1 > R": lambda t: t.dequantize(0, R + 1),
    "dequantize r0 < 0": lambda t: t.dequantize(-1, 5),
    "dequantize r0 float": lambda t: t.dequantize(1.0, 5),
    "dequantize out shape": lambda t: t.dequantize(0, 8, out=np.zeros((8, C + 1), np.float32)),
    "dequantize out rows": lambda t: t.dequantize(0, 8, out=np.zeros((9, C), np.float32)),
    "dequantize threads": lambda t: t.dequantize(threads=1000),
}


def _readonly(n):
    a = np.zeros(n, np.float32)
    a.setflags(write=False)
    return a


def _overlap_matvec(t):
    # R != C here, so a shared buffer whose first R floats are y and whose first C floats are x
    buf = np.ones(max(R, C), np.float32)
    return t.matvec(buf[:C], out=buf[:R])


def _overlap_matmul(t):
    buf = np.ones(3 * max(R, C), np.float32)
    return t.matmul(buf[:3 * C].reshape(3, C), out=buf[:3 * R].reshape(3, R))


@pytest.mark.parametrize("what", list(BAD_CALLS))
def test_bad_call_arguments(what):
    t = _t()
    with pytest.raises(QggufError):
        BAD_CALLS[what](t)


def test_isa_names():
    for bad in ("sse9", "", "AVX2 ", None, 2):
        with pytest.raises(QggufError):
            native.set_isa(bad)


def test_c_entry_points_check_their_arguments():
    """Defence in depth: the C library itself refuses null pointers, bad row ranges, bad B/shapes and a
    negative N, and returns an error message (no crash)."""
    ffi, lib = native._ffi, native._lib
    t = _t()
    out = np.zeros((R, C), np.float32)
    po = ffi.cast("float *", ffi.from_buffer(out))
    x = np.ones(C, np.float32)
    px = ffi.cast("float *", ffi.from_buffer(x))
    assert lib.qg_dequantize_rows(t._t, 0, R + 1, po, 1) == -1
    assert "row range" in ffi.string(lib.qg_last_error()).decode()
    assert lib.qg_dequantize_rows(t._t, -1, 4, po, 1) == -1
    assert lib.qg_dequantize_rows(t._t, 0, 4, ffi.NULL, 1) == -1
    assert lib.qg_matvec(t._t, ffi.NULL, po, 1) == -1
    assert lib.qg_matmul(t._t, px, -1, po, 1) == -1
    assert lib.qg_matvec(ffi.NULL, px, po, 1) == -1
    for field, value in (("B", 12), ("g", 0), ("g", 12), ("g", 32), ("C", 60), ("R", 0), ("M", 0), ("cbT", ffi.NULL),
                         ("codes", ffi.NULL), ("scales", ffi.NULL), ("type", 99)):
        t2 = ffi.new("qg_tensor *", t._t[0])
        setattr(t2, field, value)
        assert lib.qg_matvec(t2, px, po, 1) == -1, field
        assert lib.qg_dequantize_rows(t2, 0, 1, po, 1) == -1, field
    # thread counts outside [1, 256] are clamped by the C side, not trusted
    assert lib.qg_dequantize_rows(t._t, 0, R, po, 100000) == 0
    np.testing.assert_array_equal(out, t.dequantize())


def _relerr(y, ref):
    return float(np.linalg.norm(y.astype(np.float64) - ref) / np.linalg.norm(ref))


def test_odd_but_valid_inputs_are_copied_or_read_correctly():
    t = _t()
    ref = t.dequantize().astype(np.float64)
    rng = np.random.default_rng(3)
    x = rng.standard_normal(C).astype(np.float32)
    y = t.matvec(x)
    assert _relerr(y, ref @ x) < aq_tol()
    np.testing.assert_array_equal(t.matvec(misaligned(x)), y)                 # misaligned x: copied
    np.testing.assert_array_equal(t.matvec(np.repeat(x, 2)[::2]), y)          # strided x
    np.testing.assert_array_equal(t.matvec(x.astype(">f4")), y)               # big-endian x
    np.testing.assert_array_equal(t.matvec(x.astype(np.float16).astype(np.float32)),
                                  t.matvec(x.astype(np.float16)))             # float16 x
    X = rng.standard_normal((5, C)).astype(np.float32)
    np.testing.assert_array_equal(t.matmul(np.asfortranarray(X)), t.matmul(X))
    # read-only codes (a read-only memory map, a frozen array) are fine
    ro = CODES.copy()
    ro.setflags(write=False)
    np.testing.assert_array_equal(native.AQTensor(**{**OK, "codes": ro}).dequantize(), ref.astype(np.float32))
    # big-endian / float16 codebooks and scales are converted into the tensor's own copies
    t2 = native.AQTensor(**{**OK, "codebooks": CB.astype(">f4"), "scales": S.astype(">f4")})
    np.testing.assert_array_equal(t2.dequantize(), ref.astype(np.float32))
    cb = CB.copy()
    s = S.copy()
    t3 = native.AQTensor(**{**OK, "codebooks": cb, "scales": s})
    cb[:] = np.nan                      # changing the caller's arrays afterwards does not reach the kernel
    s[:] = np.inf
    np.testing.assert_array_equal(t3.dequantize(), ref.astype(np.float32))


def test_codes_at_every_index_bound():
    """Codes at 0 and 2^B - 1 (the codebook's first and last entries) on every ISA path, both code widths."""
    for b in (8, 16):
        codes, cb, s = parts(M=1, B=b, R=R, C=C, seed=b)
        codes[::2] = (1 << b) - 1
        codes[1::2] = 0
        t = native.AQTensor(codes, cb, s, 1, b, G, R, C)
        J = C // G
        want = cb[0][codes[:, 0, :]].transpose(1, 0, 2).reshape(R, J * G) * s[:, None]
        x = np.ones(C, np.float32)
        for isa in native.isas():
            with native.use_isa(isa):
                np.testing.assert_array_equal(t.dequantize(threads=2), want)
                assert _relerr(t.matvec(x, threads=2), want.astype(np.float64) @ x) < aq_tol(1, b), (b, isa)


def test_module_dir_override(tmp_path):
    """QGGUF_NATIVE_MODULE_DIR (the sanitizer build's hook) loads the module from that folder; an empty folder
    gives 'native kernels unavailable', not a crash."""
    import sys
    code = "from qgguf import native; print(native.available(), native.module_file())"
    env = {**os.environ, "QGGUF_NATIVE_MODULE_DIR": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.split() == ["False", "None"], r
    so = Path(native.module_file())
    shutil.copy(so, tmp_path / so.name)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.split() == ["True", str(tmp_path / so.name)], r


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("gcc"), reason="needs gcc")
def test_make_sanitize():
    """tools/sanitize.sh: canaries caught, kernel tests pass on every ISA path, zero sanitizer findings."""
    if os.environ.get("QGGUF_NATIVE_MODULE_DIR"):
        pytest.skip("already running under the sanitizer")
    r = subprocess.run(["bash", str(ROOT / "tools" / "sanitize.sh")], cwd=ROOT, capture_output=True, text=True,
                       timeout=1200)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "ASan canary: caught" in r.stdout and "UBSan canary: caught" in r.stdout
    assert re.search(r"sanitizer findings: 0\b", r.stdout)
