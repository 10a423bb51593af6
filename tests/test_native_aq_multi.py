"""qgguf.native.matvec_multi / BoundMatvec (several tensors sharing one input, one native call): against float64
numpy on every ISA path, bit-identical to per-tensor matvec, and the argument checks at the Python boundary."""
from __future__ import annotations

import numpy as np
import pytest

from _shared import aq_tol
from qgguf import native
from qgguf.errors import QggufError

pytestmark = pytest.mark.skipif(not native.available(), reason="native module not built")


def aq(M, B, g, R, C, seed):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 1 << B, (C // g, M, R), dtype=np.uint8 if B == 8 else np.uint16)
    cb = (rng.standard_normal((M, 1 << B, g)) * 0.05).astype(np.float16)
    s = (rng.random(R) + 0.5).astype(np.float32)
    t = native.AQTensor(codes, cb, s, M, B, g, R, C)
    # float64 reference of W (the dequantization is exact in float32, tests/test_native_aq.py)
    return t, t.dequantize().astype(np.float64)


def vq(R, C, seed):
    from qgguf import gguf_types
    from qgguf.gguf_types import vq as V
    qt = gguf_types.get("vq-v8-k256")
    rng = np.random.default_rng(seed)
    comp = qt.pack(qt.random_fields((R, C), rng))
    L = qt.layout((R, C))
    t = native.VQTensor(comp[V.VQ_IDX], comp[V.VQ_BOOKS], comp[V.VQ_PERM], comp[V.VQ_COLSCALE],
                        comp[V.VQ_COLBIAS], v=qt.v, k=qt.k, R=R, C=C, n_out=L["n_out"], groups=qt.groups)
    return t, t.dequantize().astype(np.float64)          # its dequantization: tests/test_native_vq.py


def relerr(y, ref):
    return float(np.linalg.norm(y.astype(np.float64) - ref) / np.linalg.norm(ref))


# (q, k, v)-like groups: the same C, different R (odd ones too), mixed kinds of prepared input
GROUPS = {
    "2x8-g8 qkv": [(2, 8, 8, 256), (2, 8, 8, 64), (2, 8, 8, 64)],
    "odd rows, g16": [(2, 8, 16, 200), (1, 8, 16, 77)],
    "B=8 with B=16 (no table)": [(1, 16, 8, 130), (2, 8, 8, 96), (1, 8, 8, 33)],
}


@pytest.mark.parametrize("name", list(GROUPS))
def test_matvec_multi_against_reference(name):
    C = 512 + 48                                    # C % 64 != 0, several LUT tiles
    pairs = [aq(M, B, g, R, C, seed=i + 10 * M + B + g) for i, (M, B, g, R) in enumerate(GROUPS[name])]
    ts = [p[0] for p in pairs]
    rng = np.random.default_rng(3)
    x = rng.standard_normal(C).astype(np.float32)
    x[rng.integers(0, C, 3)] *= 30.0
    for isa in native.isas():
        with native.use_isa(isa):
            for threads in (1, 2, 3):
                ys = native.matvec_multi(ts, x, threads)
                assert len(ys) == len(ts)
                for (t, W64), y in zip(pairs, ys):
                    assert y.dtype == np.float32 and y.shape == (t.R,)
                    assert relerr(y, W64 @ x.astype(np.float64)) < aq_tol(1, t.B), (isa, threads)
                    np.testing.assert_array_equal(y, t.matvec(x, threads))      # bit-identical to one call each


def test_matvec_multi_with_vq():
    C = 256
    a, Wa = aq(2, 8, 8, 128, C, seed=1)
    v, Wv = vq(64, C, seed=2)
    x = np.random.default_rng(4).standard_normal(C).astype(np.float32)
    for threads in (1, 2):
        ya, yv = native.matvec_multi([a, v], x, threads)
        assert relerr(ya, Wa @ x) < aq_tol() and relerr(yv, Wv @ x) < 2e-4
        np.testing.assert_array_equal(ya, a.matvec(x, threads))
        np.testing.assert_array_equal(yv, v.matvec(x, threads))


def test_bound_matvec_reads_buffers_in_place():
    C = 320
    pairs = [aq(2, 8, 8, R, C, seed=R) for R in (192, 64)]
    ts = [p[0] for p in pairs]
    x = np.zeros(C, np.float32)
    outs = [np.full(t.R, np.nan, np.float32) for t in ts]
    for n in (1, 2):
        bound = native.BoundMatvec(ts[:n], x, outs[:n], threads=2)
        rng = np.random.default_rng(n)
        for _ in range(3):
            x[:] = rng.standard_normal(C)                # new contents, same buffer: the next call sees them
            bound()
            for (t, W64), y in zip(pairs[:n], outs[:n]):
                assert relerr(y, W64 @ x.astype(np.float64)) < aq_tol()
                np.testing.assert_array_equal(y, t.matvec(x))


def test_matvec_multi_argument_checks():
    a, _ = aq(2, 8, 8, 64, 128, seed=1)
    b, _ = aq(1, 8, 8, 32, 128, seed=2)
    c, _ = aq(1, 8, 8, 32, 256, seed=3)
    x = np.ones(128, np.float32)
    ok = [np.empty(64, np.float32), np.empty(32, np.float32)]
    bad = [
        (([], x), "1 to 16"),
        (([a] * 17, x), "1 to 16"),
        (([a, "w"], x), "tensors\\[1\\] must be an AQTensor"),
        (((a, c), x), "C=256"),
        (([a, b], np.ones(127, np.float32)), "shape"),
        (([a, b], np.ones(128, np.int32)), "float"),
        (([a, b], x.tolist()), "numpy array"),
    ]
    for args, msg in bad:
        with pytest.raises(QggufError, match=msg):
            native.matvec_multi(*args)
    with pytest.raises(QggufError, match="threads"):
        native.matvec_multi([a, b], x, threads=0)
    with pytest.raises(QggufError, match="list of 2"):
        native.matvec_multi([a, b], x, outs=ok[:1])
    with pytest.raises(QggufError, match="outs\\[1\\]"):
        native.matvec_multi([a, b], x, outs=[ok[0], np.empty(33, np.float32)])
    with pytest.raises(QggufError, match="outs\\[0\\]"):
        native.matvec_multi([a, b], x, outs=[np.empty(64, np.float64), ok[1]])
    shared = np.empty(96, np.float32)
    with pytest.raises(QggufError, match="overlaps"):
        native.matvec_multi([a, b], x, outs=[shared[:64], shared[40:72]])
    ys = native.matvec_multi([a, b], x, outs=[shared[:64], shared[64:]])      # adjacent views are fine
    np.testing.assert_array_equal(ys[0], a.matvec(x))
    both = np.ones(128 + 64, np.float32)
    with pytest.raises(QggufError, match="overlap the input"):
        native.matvec_multi([a], both[:128], outs=[both[64:128]])
    with pytest.raises(QggufError, match="C-contiguous float32"):
        native.BoundMatvec([a], np.ones(256, np.float32)[::2], [ok[0]])
    with pytest.raises(QggufError, match="C-contiguous float32"):
        native.BoundMatvec([a], np.ones(128, np.float64), [ok[0]])
    with pytest.raises(QggufError, match="outs must be given"):
        native.BoundMatvec([a], x, None)


def test_c_entry_rejects_bad_counts():
    """The C entry point checks its own arguments too (a caller that bypasses the Python layer)."""
    from qgguf.native import _ffi, _lib
    a, _ = aq(1, 8, 8, 64, 128, seed=1)
    x = np.ones(128, np.float32)
    y = np.empty(64, np.float32)
    ts = _ffi.new("const qg_tensor *[]", [a._t])
    ys = _ffi.new("float *[]", [_ffi.cast("float *", _ffi.from_buffer(y))])
    px = _ffi.cast("const float *", _ffi.from_buffer(x))
    assert _lib.qg_matvec_multi(ts, 0, px, ys, 1) == -1
    assert _lib.qg_matvec_multi(ts, 17, px, ys, 1) == -1
    assert _lib.qg_matvec_multi(ts, 1, _ffi.NULL, ys, 1) == -1
    assert _lib.qg_matvec_multi(ts, 1, px, ys, 1) == 0
    np.testing.assert_array_equal(y, a.matvec(x))


@pytest.mark.parametrize("R,C", [(130, 77), (64, 16), (1, 1), (4096, 576)])
def test_bound_dense_matvec(R, C):
    """The decoder's dense output product on the native pool: every ISA's float micro-kernel, odd shapes
    (C % 16 != 0, R not a multiple of the 64-row chunks), in place on fixed buffers."""
    rng = np.random.default_rng(R + C)
    W = rng.standard_normal((R, C)).astype(np.float32)
    x = np.zeros(C, np.float32)
    out = np.full(R, np.nan, np.float32)
    for isa in native.isas():
        with native.use_isa(isa):
            for threads in (1, 2, 3):
                bound = native.BoundDenseMatvec(W, x, out, threads)
                for _ in range(2):
                    x[:] = rng.standard_normal(C)
                    bound()
                    ref = W.astype(np.float64) @ x.astype(np.float64)
                    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max(), err_msg=isa)


def test_bound_dense_matvec_argument_checks():
    W = np.ones((8, 4), np.float32)
    x, out = np.ones(4, np.float32), np.zeros(8, np.float32)
    for args in ((W.astype(np.float64), x, out), (W, x[:3], out), (W, x, out[:7]), (np.asfortranarray(W), x, out),
                 (W, x, W[:, 0]), (W, x, W.reshape(-1)[:8]), (W, x.astype(np.float16), out)):
        with pytest.raises(QggufError):
            native.BoundDenseMatvec(*args)
    with pytest.raises(QggufError):
        native.BoundDenseMatvec(W, x, out, threads=0)
    ro = out.copy()
    ro.setflags(write=False)
    with pytest.raises(QggufError):
        native.BoundDenseMatvec(W, x, ro)
