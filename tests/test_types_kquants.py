"""K-quants (Q2_K..Q6_K) and the scale-search primitives.

Always run: round trips against gguf-py's numpy dequantizers, pack/unpack, field ranges, error bounds,
errors. With llama-cpp-python (marked ``llamacpp``): byte-for-byte equality with ggml's
``ggml_quantize_chunk``, without and with an importance vector.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import quants as gq

from qgguf.errors import BadWeightsError, QggufError
from qgguf.gguf_types import get, kquants
from qgguf.gguf_types import search as S

sys.path.insert(0, str(Path(__file__).resolve().parent))

KTYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
STORIES = SHARED / "models" / "stories260K.gguf"

# fields: name -> (dtype, trailing shape, lo, hi); d/dmin are float16 (rows, nb)
SPEC = {
    "Q2_K": {"scales": (np.uint8, 16, 0, 15), "mins": (np.uint8, 16, 0, 15), "q": (np.uint8, 256, 0, 3)},
    "Q3_K": {"scales": (np.uint8, 16, 0, 63), "q": (np.uint8, 256, 0, 7)},
    "Q4_K": {"scales": (np.uint8, 8, 0, 63), "mins": (np.uint8, 8, 0, 63), "q": (np.uint8, 256, 0, 15)},
    "Q5_K": {"scales": (np.uint8, 8, 0, 63), "mins": (np.uint8, 8, 0, 63), "q": (np.uint8, 256, 0, 31)},
    "Q6_K": {"scales": (np.int8, 16, -128, 127), "q": (np.uint8, 256, 0, 63)},
}
HAS_DMIN = {"Q2_K", "Q4_K", "Q5_K"}
# RMS error / RMS of N(0,1) data, generous bounds above what llama.cpp's rounding gives
RMSE_BOUND = {"Q2_K": 0.36, "Q3_K": 0.19, "Q4_K": 0.09, "Q5_K": 0.045, "Q6_K": 0.022}


def _data(kind: str, rows: int, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "normal":
        x = rng.standard_normal((rows, n))
    elif kind == "uniform":
        x = rng.uniform(-1, 1, (rows, n))
    elif kind == "laplace":
        x = rng.laplace(0, 0.02, (rows, n))
    elif kind == "student":                         # heavy tails
        x = rng.standard_t(2.5, (rows, n)) * 0.05
    elif kind == "positive":
        x = np.abs(rng.standard_normal((rows, n))) + 0.5
    elif kind == "negative":
        x = -np.abs(rng.standard_normal((rows, n))) * 3
    elif kind == "outliers":
        x = rng.standard_normal((rows, n)) * 0.01
        idx = rng.integers(0, x.size, max(1, x.size // 200))
        x.flat[idx] = rng.standard_normal(idx.size) * 5
    elif kind == "zeros":                           # whole rows, half rows, single sub-blocks of zeros
        x = rng.standard_normal((rows, n))
        x[0] = 0
        if rows > 1:
            x[1, : n // 2] = 0
        if rows > 2:
            x[2, 16:48] = 0
            x[2, 100] = 1e-20
    elif kind == "sparse":
        x = rng.standard_normal((rows, n)) * (rng.random((rows, n)) < 0.1)
    elif kind == "constant":
        x = np.full((rows, n), 0.25)
        if rows > 1:
            x[1] = -3.0
    elif kind == "tiny":
        x = rng.standard_normal((rows, n)) * 1e-6
    elif kind == "large":
        x = rng.standard_normal((rows, n)) * 300
    elif kind == "discrete":                        # many ties in the searches
        x = rng.integers(-3, 4, (rows, n)) * 0.125
    else:
        raise ValueError(kind)
    return x.astype(np.float32)


KINDS = ["normal", "uniform", "laplace", "student", "positive", "negative", "outliers", "zeros", "sparse",
         "constant", "tiny", "large", "discrete"]


# ------------------------------------------------------------------------------------------------
# search primitives
# ------------------------------------------------------------------------------------------------
def test_nearest_int_is_round_half_even():
    vals = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.49999997, 3.7, -3.7, 4194303.0, -4194303.0, 0.0],
                    dtype=np.float32)
    for v in vals:
        assert S.nearest_int(np.float32(v)) == int(np.rint(v)), v
    rng = np.random.default_rng(1)
    for v in (rng.standard_normal(200) * 1000).astype(np.float32):
        assert S.nearest_int(v) == int(np.rint(v))


def test_fp16_conversion_matches_numpy():
    rng = np.random.default_rng(2)
    v = rng.standard_normal(3000).astype(np.float32) * (10.0 ** rng.integers(-9, 6, 3000)).astype(np.float32)
    v = np.concatenate([v, np.array([65504, 65519.99, 65520, 1e6, 1e-8, 2 ** -24, 2 ** -25, 3 * 2 ** -26,
                                     6.1e-5, 0.0, -0.0, 1.0, -2.0], np.float32)])
    with np.errstate(over="ignore"):
        want = v.astype(np.float16)
    got = np.array([S.fp32_to_fp16_bits(f) for f in v], dtype=np.uint16)
    assert np.array_equal(got, want.view(np.uint16))
    back = np.array([S.fp16_bits_to_fp32(h) for h in got], dtype=np.float32)
    assert np.array_equal(back, want.astype(np.float32))


def test_search_primitives_outputs_in_range():
    rng = np.random.default_rng(3)
    x = rng.standard_normal(32).astype(np.float32)
    L = np.zeros(32, np.uint8)
    Laux = np.zeros(32, np.uint8)
    scale, the_min = S.make_qkx2_quants(32, 15, x, np.abs(x), L, Laux, -1.0, 0.1, 20, False)
    assert scale > 0 and the_min >= 0 and L.max() <= 15
    assert np.abs(scale * L - the_min - x).max() <= 1.01 * scale
    scale3, min3 = S.make_qkx3_quants(32, 15, x, S.EMPTY_F32, L, Laux, -0.9, 0.05, 36, False)
    assert scale3 > 0 and L.max() <= 15
    Li = np.zeros(16, np.int8)
    s = S.make_qx_quants(16, 32, x[:16], Li, 1, S.EMPTY_F32)
    assert Li.min() >= 0 and Li.max() <= 63
    assert np.abs(s * (Li.astype(np.float32) - 32) - x[:16]).max() <= 0.51 * abs(s) + 1e-6
    s3 = S.make_q3_quants(16, 4, x[:16], Li, True)
    assert Li[:16].min() >= 0 and Li[:16].max() <= 7 and s3 != 0
    Lp = np.zeros(8, np.uint8)
    sp = S.make_qp_quants(8, 63, np.abs(x[:8]), Lp, np.ones(8, np.float32))
    assert sp > 0 and Lp.max() <= 63
    assert S.make_qx_quants(16, 32, np.zeros(16, np.float32), Li, 1, S.EMPTY_F32) == 0


# ------------------------------------------------------------------------------------------------
# round trips (no llama.cpp needed)
# ------------------------------------------------------------------------------------------------
def test_registered():
    for name in KTYPES:
        qt = get(name)
        assert qt.ggml_type == int(T[name]) and qt.block_size == 256 and qt.standard
    assert [get(n).type_size for n in KTYPES] == [84, 110, 144, 176, 210]


@pytest.mark.parametrize("name", KTYPES)
@pytest.mark.parametrize("imp", [False, True])
def test_dequantize_matches_gguf_py(name, imp):
    qt = get(name)
    x = np.concatenate([_data("normal", 6, 512), _data("zeros", 3, 512, 1), _data("outliers", 3, 512, 2)])
    importance = np.random.default_rng(5).random(512).astype(np.float32) + 0.01 if imp else None
    data = qt.quantize(x, importance)
    assert data.shape == (12, 2 * qt.type_size) and data.dtype == np.uint8
    ours = qt.dequantize(data)
    ref = gq.dequantize(data, T[name])
    assert ours.dtype == np.float32 and ours.shape == x.shape
    np.testing.assert_array_equal(ours, ref)
    # 3-D input is flattened to rows; dequantize with a shape restores it
    data3 = qt.quantize(x.reshape(3, 4, 512), importance)
    assert np.array_equal(data3, data)
    assert qt.dequantize(data3.reshape(-1), (3, 4, 512)).shape == (3, 4, 512)


@pytest.mark.parametrize("name", KTYPES)
def test_unpack_fields_and_pack_round_trip(name):
    qt = get(name)
    x = np.concatenate([_data(k, 3, 768, i) for i, k in enumerate(KINDS)])
    for importance in (None, np.random.default_rng(6).random(768).astype(np.float32) + 0.1):
        data = qt.quantize(x, importance)
        f = qt.unpack(data)
        rows, nb = x.shape[0], 3
        want = {"d", "scales", "q"} | ({"dmin", "mins"} if name in HAS_DMIN else set())
        assert set(f) == want
        assert f["d"].dtype == np.float16 and f["d"].shape == (rows, nb)
        if name in HAS_DMIN:
            assert f["dmin"].dtype == np.float16 and f["dmin"].shape == (rows, nb)
        for key, (dt, m, lo, hi) in SPEC[name].items():
            a = f[key]
            assert a.dtype == dt and a.shape == (rows, nb, m), (key, a.dtype, a.shape)
            assert a.min() >= lo and a.max() <= hi, (key, a.min(), a.max())
        assert np.array_equal(qt.pack(f), data)
        np.testing.assert_array_equal(kquants.values(name, f), qt.dequantize(data))
        np.testing.assert_array_equal(kquants.VALUES[name](f), qt.dequantize(data))


def _random_fields(name: str, rows: int, nb: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    f = {"d": (rng.random((rows, nb)) * 0.1).astype(np.float16)}
    if name in HAS_DMIN:
        f["dmin"] = (rng.random((rows, nb)) * 0.1).astype(np.float16)
    for key, (dt, m, lo, hi) in SPEC[name].items():
        f[key] = rng.integers(lo, hi + 1, (rows, nb, m)).astype(dt)
    return f


@pytest.mark.parametrize("name", KTYPES)
def test_pack_unpack_arbitrary_fields(name):
    qt = get(name)
    f = _random_fields(name, 5, 4, 7)
    data = qt.pack(f)
    assert data.shape == (5, 4 * qt.type_size) and data.dtype == np.uint8
    g = qt.unpack(data)
    for key in f:
        assert g[key].dtype == f[key].dtype
        np.testing.assert_array_equal(g[key], f[key])
    # values follow each type's documented formula
    v = qt.dequantize(data).reshape(5, 4, 256)
    k = np.arange(256)
    d = f["d"].astype(np.float32)[..., None]
    if name == "Q2_K":
        want = d * f["scales"][..., k // 16] * f["q"] - f["dmin"].astype(np.float32)[..., None] * f["mins"][..., k // 16]
    elif name == "Q3_K":
        want = d * (f["scales"][..., k // 16].astype(np.float32) - 32) * (f["q"].astype(np.float32) - 4)
    elif name in ("Q4_K", "Q5_K"):
        want = d * f["scales"][..., k // 32] * f["q"] - f["dmin"].astype(np.float32)[..., None] * f["mins"][..., k // 32]
    else:
        want = d * f["scales"][..., k // 16] * (f["q"].astype(np.float32) - 32)
    np.testing.assert_allclose(v, want, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(qt.dequantize(data), gq.dequantize(data, T[name]))


@pytest.mark.parametrize("name", KTYPES)
def test_pack_rejects_bad_fields(name):
    qt = get(name)
    f = _random_fields(name, 2, 1, 8)
    bad = dict(f)
    key, (dt, m, lo, hi) = next(iter(SPEC[name].items()))
    bad[key] = f[key].astype(np.int16) + (hi - lo + 1)
    with pytest.raises(QggufError):
        qt.pack(bad)
    bad = dict(f)
    bad["q"] = f["q"].astype(np.int16)
    bad["q"][0, 0, 0] = SPEC[name]["q"][3] + 1
    with pytest.raises(QggufError):
        qt.pack(bad)
    bad = dict(f)
    del bad["d"]
    with pytest.raises(QggufError):
        qt.pack(bad)
    bad = dict(f)
    bad["scales"] = f["scales"][:, :, :-1]
    with pytest.raises(QggufError):
        qt.pack(bad)


@pytest.mark.parametrize("name", KTYPES)
def test_error_bound_and_importance(name):
    qt = get(name)
    x = _data("normal", 64, 1024, 9)
    rmse = float(np.sqrt(((qt.dequantize(qt.quantize(x)) - x) ** 2).mean()))
    assert rmse < RMSE_BOUND[name], rmse
    # importance concentrated on some columns lowers the weighted error there
    imp = np.full(1024, 0.01, np.float32)
    imp[::7] = 100.0
    e_ref = ((qt.dequantize(qt.quantize(x)) - x) ** 2 * imp).sum()
    e_imp = ((qt.dequantize(qt.quantize(x, imp)) - x) ** 2 * imp).sum()
    assert e_imp < e_ref
    rmse_imp = float(np.sqrt(((qt.dequantize(qt.quantize(x, np.ones(1024, np.float32))) - x) ** 2).mean()))
    assert rmse_imp < RMSE_BOUND[name] * 1.1, rmse_imp


@pytest.mark.parametrize("name", KTYPES)
def test_zero_and_constant_rows(name):
    qt = get(name)
    x = np.zeros((2, 256), np.float32)
    for imp in (None, np.ones(256, np.float32)):
        data = qt.quantize(x, imp)
        assert np.array_equal(qt.dequantize(data), x)
    c = np.full((1, 256), 0.5, np.float32)
    assert np.abs(qt.dequantize(qt.quantize(c)) - c).max() < 0.05


@pytest.mark.parametrize("name", KTYPES)
def test_user_errors(name):
    qt = get(name)
    with pytest.raises(QggufError):
        qt.quantize(np.zeros((2, 100), np.float32))
    with pytest.raises(QggufError):
        qt.quantize(np.zeros((2, 512), np.float32), np.ones(256, np.float32))
    x = np.zeros((2, 256), np.float32)
    x[1, 3] = np.nan
    with pytest.raises(BadWeightsError):
        qt.quantize(x)
    with pytest.raises(QggufError):
        qt.dequantize(np.zeros((2, qt.type_size + 1), np.uint8))
    with pytest.raises(QggufError):
        kquants.values("Q4_0", {})


# ------------------------------------------------------------------------------------------------
# bit-exact against llama.cpp's ggml
# ------------------------------------------------------------------------------------------------
def _ref():
    pytest.importorskip("llama_cpp")
    from ggml_ref import ggml_quantize
    return ggml_quantize


def _assert_same(name, ours, ref, what):
    if not np.array_equal(ours, ref):
        bad = np.argwhere(ours != ref)
        bs = get(name).type_size
        r, c = bad[0]
        pytest.fail(f"{name} {what}: {len(bad)} bytes differ, first row {r} block {c // bs} byte {c % bs}")


@pytest.mark.llamacpp
@pytest.mark.parametrize("name", KTYPES)
@pytest.mark.parametrize("n", [256, 512, 1536])
def test_bit_exact_with_llama_cpp(name, n):
    ggml_quantize = _ref()
    qt = get(name)
    rng = np.random.default_rng(n)
    imps = {
        "uniform": rng.random(n).astype(np.float32) + 0.01,
        "skewed": (rng.lognormal(0, 2, n)).astype(np.float32),
        "ones": np.ones(n, np.float32),
    }
    for i, kind in enumerate(KINDS):
        x = _data(kind, 4, n, seed=100 * i + n)
        _assert_same(name, qt.quantize(x), ggml_quantize(name, x), f"{kind} ref")
        for iname, imp in imps.items():
            _assert_same(name, qt.quantize(x, imp), ggml_quantize(name, x, imp), f"{kind} imatrix {iname}")


def _stories_rows():
    if not STORIES.exists():
        pytest.skip(f"{STORIES} missing")
    from gguf import GGUFReader
    r = GGUFReader(STORIES)
    out = []
    for t in r.tensors:
        if t.tensor_type == T.F32 and t.n_elements >= 2048:
            flat = np.asarray(t.data, dtype=np.float32).reshape(-1)
            out.append((t.name, flat[: flat.size // 256 * 256].reshape(-1, 256)))
    return out


@pytest.mark.llamacpp
@pytest.mark.parametrize("name", KTYPES)
def test_bit_exact_on_stories260k(name):
    ggml_quantize = _ref()
    qt = get(name)
    tensors = _stories_rows()
    assert tensors
    rng = np.random.default_rng(11)
    imp = (rng.random(256) ** 2).astype(np.float32) + 1e-3
    for tname, x in tensors:
        _assert_same(name, qt.quantize(x), ggml_quantize(name, x), f"{tname} ref")
        _assert_same(name, qt.quantize(x, imp), ggml_quantize(name, x, imp), f"{tname} imatrix")
        # ggml dequantization of our bytes is what gguf-py and we compute
        np.testing.assert_array_equal(qt.dequantize(qt.quantize(x)), gq.dequantize(qt.quantize(x), T[name]))


@pytest.mark.llamacpp
@pytest.mark.parametrize("name", KTYPES)
def test_bit_exact_extremes_and_threads(name, monkeypatch):
    ggml_quantize = _ref()
    qt = get(name)
    rng = np.random.default_rng(12)
    base = rng.standard_normal((3, 512)).astype(np.float32)
    imp = rng.random(512).astype(np.float32)
    imp[:40] = 0.0                                   # zero importance on whole sub-blocks
    for scale in (1e-38, 1e-30, 1e-8, 1e4, 1e6):     # subnormals, fp16 underflow and overflow of d
        x = (base * np.float32(scale)).astype(np.float32)
        _assert_same(name, qt.quantize(x), ggml_quantize(name, x), f"x{scale:g} ref")
        _assert_same(name, qt.quantize(x, imp), ggml_quantize(name, x, imp), f"x{scale:g} imatrix")
    # enough rows to be split over threads
    monkeypatch.setenv("QGGUF_THREADS", "3")
    x = _data("student", 97, 1024, 13)
    _assert_same(name, qt.quantize(x), ggml_quantize(name, x), "threads ref")
    _assert_same(name, qt.quantize(x, imp[:1].repeat(1024) + 0.5), ggml_quantize(name, x, imp[:1].repeat(1024) + 0.5),
                 "threads imatrix")
