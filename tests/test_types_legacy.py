"""Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL: layouts, round trips, and bytes identical to llama.cpp's."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf import quants as gq
from gguf.constants import GGML_QUANT_SIZES

from qgguf.errors import QggufError
from qgguf.gguf_types import by_ggml, get, legacy

NAMES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL"]
GGUFPY_QUANTIZES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]  # gguf-py has no IQ4_NL quantizer
CODE_RANGE = {"Q8_0": (-128, 127), "Q4_0": (0, 15), "Q4_1": (0, 15), "Q5_0": (0, 31), "Q5_1": (0, 31),
              "IQ4_NL": (0, 15)}
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
STORIES = SHARED / "models" / "stories260K.gguf"


def _data(kind: str, rows: int = 24, n: int = 256, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "normal":
        return rng.standard_normal((rows, n)).astype(np.float32)
    if kind == "laplace":
        return (rng.laplace(size=(rows, n)) * 0.02).astype(np.float32)
    if kind == "outliers":
        x = rng.standard_normal((rows, n)).astype(np.float32)
        x[:, ::7] *= 50
        x[1] = 0                 # an all-zero row
        x[2, :32] = 0            # an all-zero block
        x[3, 32:64] = 1.5        # a constant block
        x[4, 64:96] = -0.25      # a negative constant block
        return x
    if kind == "positive":
        return rng.uniform(0.1, 1.0, (rows, n)).astype(np.float32)
    if kind == "sparse":
        return (rng.standard_normal((rows, n)) * (rng.random((rows, n)) < 0.05)).astype(np.float32)
    if kind == "grid":  # many exact ties in the rounding
        return (rng.integers(-16, 16, (rows, n)) * 0.5 + 0.25).astype(np.float32)
    if kind == "tiny":
        return (rng.standard_normal((rows, n)) * 1e-6).astype(np.float32)
    if kind == "mixed_scales":
        return (rng.standard_normal((rows, n)) * 10.0 ** rng.integers(-20, 10, (rows, n))).astype(np.float32)
    raise AssertionError(kind)


KINDS = ["normal", "laplace", "outliers", "positive", "sparse", "grid", "tiny", "mixed_scales"]


def _importance(n: int, seed: int = 1, zeros: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    imp = rng.uniform(0.01, 3.0, n).astype(np.float32)
    if zeros:
        imp[rng.random(n) < 0.3] = 0
    return imp


# ------------------------------------------------------------------------------------------------
# registry and sizes
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_registered_with_ggml_ids_and_sizes(name):
    qt = get(name.lower())
    gt = GGMLQuantizationType[name]
    assert qt.ggml_type == int(gt) and by_ggml(int(gt)) is qt
    assert (qt.block_size, qt.type_size) == GGML_QUANT_SIZES[gt]
    assert qt.standard and not qt.is_float
    assert qt.row_bytes(256) == 8 * qt.type_size
    assert name in legacy.VALUES


# ------------------------------------------------------------------------------------------------
# against gguf-py (always run)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", ["normal", "outliers", "positive"])
def test_dequantize_matches_gguf_py(name, kind):
    qt = get(name)
    x = _data(kind)
    for imp in (None, _importance(x.shape[1])):
        data = qt.quantize(x, imp)
        ours = qt.dequantize(data)
        ref = gq.dequantize(data, GGMLQuantizationType[name])
        assert ours.dtype == np.float32 and ours.shape == x.shape
        np.testing.assert_array_equal(ours, ref)
        np.testing.assert_array_equal(qt.dequantize(data.reshape(-1), shape=(4, 6, 256)), ref.reshape(4, 6, 256))


@pytest.mark.parametrize("name", GGUFPY_QUANTIZES)
@pytest.mark.parametrize("kind", ["normal", "laplace", "outliers", "positive", "grid"])
def test_quantize_matches_gguf_py_reference(name, kind):
    x = _data(kind)
    ours = get(name).quantize(x)
    ref = gq.quantize(x, GGMLQuantizationType[name])
    np.testing.assert_array_equal(ours, ref)


def test_q8_0_ignores_importance():
    x = _data("normal")
    qt = get("Q8_0")
    np.testing.assert_array_equal(qt.quantize(x, _importance(x.shape[1])), qt.quantize(x))


# ------------------------------------------------------------------------------------------------
# pack / unpack / values
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_unpack_pack_round_trip_and_code_ranges(name):
    qt = get(name)
    x = _data("outliers", rows=8)
    lo, hi = CODE_RANGE[name]
    for imp in (None, _importance(x.shape[1])):
        data = qt.quantize(x, imp)
        f = qt.unpack(data)
        assert f["d"].dtype == np.float16 and f["d"].shape == (8, 8)
        assert f["q"].shape == (8, 8, 32)
        assert f["q"].dtype == (np.int8 if name == "Q8_0" else np.uint8)
        assert f["q"].min() >= lo and f["q"].max() <= hi
        assert set(f) == ({"d", "m", "q"} if name in ("Q4_1", "Q5_1") else {"d", "q"})
        np.testing.assert_array_equal(qt.pack(f), data)
        # values() of the fields is the dequantization
        np.testing.assert_array_equal(legacy.VALUES[name](f).reshape(8, -1), qt.dequantize(data))
        # quantize_fields gives the same choice as quantize
        g = legacy.quantize_fields(name, x, imp)
        np.testing.assert_array_equal(qt.pack(g), data)


@pytest.mark.parametrize("name", NAMES)
def test_pack_any_codes_round_trips(name):
    qt = get(name)
    rng = np.random.default_rng(3)
    lo, hi = CODE_RANGE[name]
    q = rng.integers(lo, hi + 1, (5, 3, 32)).astype(np.int8 if name == "Q8_0" else np.uint8)
    f = {"d": rng.standard_normal((5, 3)).astype(np.float16), "q": q}
    if name in ("Q4_1", "Q5_1"):
        f["m"] = rng.standard_normal((5, 3)).astype(np.float16)
    data = qt.pack(f)
    assert data.dtype == np.uint8 and data.shape == (5, 3 * qt.type_size)
    g = qt.unpack(data)
    for k in f:
        np.testing.assert_array_equal(g[k], f[k])
    # the packed bytes mean what the fields say, for gguf-py too
    np.testing.assert_array_equal(gq.dequantize(data, GGMLQuantizationType[name]),
                                  legacy.VALUES[name](f).reshape(5, -1))
    # codes of any integer dtype are accepted
    f2 = dict(f, q=q.astype(np.int64))
    np.testing.assert_array_equal(qt.pack(f2), data)


def test_values_formulas():
    d = np.array([[0.5]], dtype=np.float16)
    m = np.array([[-1.0]], dtype=np.float16)
    q = np.arange(32, dtype=np.uint8).reshape(1, 1, 32)
    np.testing.assert_array_equal(legacy.VALUES["Q5_0"]({"d": d, "q": q})[0, 0], 0.5 * (np.arange(32) - 16))
    np.testing.assert_array_equal(legacy.VALUES["Q5_1"]({"d": d, "m": m, "q": q})[0, 0], 0.5 * np.arange(32) - 1)
    q4 = q % 16
    np.testing.assert_array_equal(legacy.VALUES["Q4_0"]({"d": d, "q": q4})[0, 0], 0.5 * (q4[0, 0] - 8.0))
    np.testing.assert_array_equal(legacy.VALUES["Q4_1"]({"d": d, "m": m, "q": q4})[0, 0], 0.5 * q4[0, 0] - 1)
    np.testing.assert_array_equal(legacy.VALUES["IQ4_NL"]({"d": d, "q": q4})[0, 0],
                                  0.5 * legacy.KVALUES_IQ4NL[q4[0, 0]].astype(np.float32))
    q8 = np.arange(-16, 16, dtype=np.int8).reshape(1, 1, 32)
    np.testing.assert_array_equal(legacy.VALUES["Q8_0"]({"d": d, "q": q8})[0, 0], 0.5 * np.arange(-16, 16))


# ------------------------------------------------------------------------------------------------
# accuracy
# ------------------------------------------------------------------------------------------------
REL_RMSE = {"Q8_0": 0.006, "Q4_0": 0.12, "Q4_1": 0.10, "Q5_0": 0.06, "Q5_1": 0.05, "IQ4_NL": 0.10}


@pytest.mark.parametrize("name", NAMES)
def test_error_bounds(name):
    qt = get(name)
    x = _data("normal", rows=32, n=512)
    for imp in (None, _importance(512)):
        y = qt.dequantize(qt.quantize(x, imp))
        rel = np.sqrt(np.mean((y - x) ** 2) / np.mean(x ** 2))
        assert rel < REL_RMSE[name], (imp is not None, rel)
    # per-block worst case of the reference rounding
    f = qt.unpack(qt.quantize(x))
    err = np.abs(qt.dequantize(qt.quantize(x)) - x).reshape(32, 16, 32).max(axis=-1)
    d = np.abs(f["d"].astype(np.float32))
    amax = np.abs(x).reshape(32, 16, 32).max(axis=-1)
    slack = 1e-3 * amax
    if name == "Q8_0":
        assert (err <= 0.5 * d + slack).all()
    elif name in ("Q4_0", "Q5_0"):  # one end of the range is clipped by one step
        assert (err <= d + slack).all()
    elif name in ("Q4_1", "Q5_1"):
        assert (err <= 0.5 * d + slack).all()
    else:  # IQ4_NL: half the widest gap of the table (24), plus clipping at the ends
        assert (err <= 14 * d + slack).all()


@pytest.mark.parametrize("name", NAMES)
def test_zero_and_constant_blocks(name):
    qt = get(name)
    x = np.zeros((2, 64), dtype=np.float32)
    x[1, 32:] = 0.75
    for imp in (None, _importance(64)):
        y = qt.dequantize(qt.quantize(x, imp))
        np.testing.assert_array_equal(y[0], 0)
        np.testing.assert_allclose(y[1, 32:], 0.75, rtol=2e-3)


# ------------------------------------------------------------------------------------------------
# user errors
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_bad_inputs_raise(name):
    qt = get(name)
    with pytest.raises(QggufError):
        qt.quantize(np.zeros((2, 48), dtype=np.float32))
    with pytest.raises(QggufError):
        qt.quantize(np.zeros((2, 64), dtype=np.float32), np.ones(32, dtype=np.float32))
    with pytest.raises(QggufError):
        qt.dequantize(np.zeros((2, qt.type_size + 1), dtype=np.uint8))
    f = qt.unpack(qt.quantize(_data("normal", rows=2, n=64)))
    lo, hi = CODE_RANGE[name]
    with pytest.raises(QggufError):  # codes out of range
        qt.pack(dict(f, q=f["q"].astype(np.int64) + (hi - lo + 1)))
    with pytest.raises(QggufError):  # wrong block length
        qt.pack(dict(f, q=f["q"][..., :16]))
    with pytest.raises(QggufError):  # scales of the wrong shape
        qt.pack(dict(f, d=f["d"][:, :1]))
    with pytest.raises(QggufError):  # float codes
        qt.pack(dict(f, q=f["q"].astype(np.float32)))
    with pytest.raises(QggufError):  # a missing field
        qt.pack({"q": f["q"]})


def test_empty_rows():
    for name in NAMES:
        qt = get(name)
        out = qt.quantize(np.zeros((0, 64), dtype=np.float32))
        assert out.shape == (0, 2 * qt.type_size)


# ------------------------------------------------------------------------------------------------
# bit-exact against llama.cpp's ggml (llama-cpp-python)
# ------------------------------------------------------------------------------------------------
def _ggml():
    pytest.importorskip("llama_cpp")
    import ggml_ref  # tests/ggml_ref.py
    try:
        ggml_ref.lib()
    except (ImportError, OSError) as e:
        pytest.skip(f"ggml library unavailable: {e}")
    return ggml_ref.ggml_quantize


def _assert_same_bytes(ours: np.ndarray, ref: np.ndarray, what: str) -> None:
    assert ours.shape == ref.shape
    bad = np.flatnonzero((ours != ref).any(axis=1))
    assert bad.size == 0, f"{what}: {bad.size} of {ours.shape[0]} rows differ from llama.cpp (first: row {bad[0]})"


@pytest.mark.llamacpp
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", KINDS)
def test_bit_exact_with_llama_cpp(name, kind):
    ggml_quantize = _ggml()
    qt = get(name)
    x = _data(kind, seed=KINDS.index(kind))
    with np.errstate(all="ignore"):
        _assert_same_bytes(qt.quantize(x), ggml_quantize(name, x), f"{name} {kind}")
        for zeros in (False, True):
            imp = _importance(x.shape[1], zeros=zeros)
            _assert_same_bytes(qt.quantize(x, imp), ggml_quantize(name, x, imp),
                               f"{name} {kind} importance{' with zeros' if zeros else ''}")


@pytest.mark.llamacpp
@pytest.mark.parametrize("name", NAMES)
def test_bit_exact_with_llama_cpp_on_stories260k(name):
    ggml_quantize = _ggml()
    if not STORIES.exists():
        pytest.skip(f"{STORIES} missing")
    from gguf import GGUFReader

    qt = get(name)
    reader = GGUFReader(STORIES)
    n = 0
    for t in reader.tensors:
        w = np.asarray(t.data).astype(np.float32)
        if w.ndim != 2 or w.shape[-1] % 32:
            continue
        imp = np.mean(w * w, axis=0) + np.float32(1e-3)  # a positive per-column importance
        _assert_same_bytes(qt.quantize(w), ggml_quantize(name, w), f"{name} {t.name}")
        _assert_same_bytes(qt.quantize(w, imp), ggml_quantize(name, w, imp), f"{name} {t.name} importance")
        n += 1
    assert n >= 10
