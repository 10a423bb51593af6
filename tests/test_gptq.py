"""quantize.grid and quantize.gptq: grids on every type, GPTQ against a float64 reference, GPTQ vs RTN."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from qgguf.gguf_types import get
from qgguf.quantize.base import QuantContext
from qgguf.quantize.gptq import GPTQ, _importance, gptq_quantize
from qgguf.quantize.grid import (GRID_TYPES, SPECS, LayerGrid, choose_scales, layer_loss, project,
                                 project_values)

LEGACY = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL"]
FIELD_RANGE = {"Q8_0": (-128, 127), "Q4_0": (0, 15), "Q4_1": (0, 15), "Q5_0": (0, 31), "Q5_1": (0, 31),
               "IQ4_NL": (0, 15), "Q2_K": (0, 3), "Q3_K": (0, 7), "Q4_K": (0, 15), "Q5_K": (0, 31),
               "Q6_K": (0, 63)}


from _shared import KQ, ncols, one_torch_thread  # noqa: E402,F401
from _shared import correlated_layer as layer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------------------
# grids
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", GRID_TYPES)
def test_grid_roundtrip_and_ranges(name):
    qt = get(name)
    rng = np.random.default_rng(1)
    n = ncols(name)
    W = rng.standard_normal((12, n)).astype(np.float32)
    W[3] = 0.0                       # an all-zero row: scale 0
    W[4, :32] = 2.5                  # a constant block
    imp = rng.random(n).astype(np.float32) + 0.1
    g = LayerGrid(qt, 12, n)
    bs = SPECS[name].block_size
    for b in range(n // bs):
        g.choose(b, W[:, b * bs:(b + 1) * bs] + 0.01, imp[b * bs:(b + 1) * bs])
        for j in range(b * bs, (b + 1) * bs):
            g.project_col(W[:, j], j)
    data = g.pack()
    vals = g.values()
    np.testing.assert_array_equal(qt.dequantize(data), vals)     # what the algorithms see == llama.cpp's values
    f = qt.unpack(data)
    lo, hi = FIELD_RANGE[name]
    assert f["q"].min() >= lo and f["q"].max() <= hi
    np.testing.assert_array_equal(f["q"], g.fields()["q"])
    for k, v in g.fields().items():
        np.testing.assert_array_equal(np.asarray(f[k]), np.asarray(v), err_msg=k)
    # the type's own quantization, wrapped as a grid, gives the type's own values
    g2 = LayerGrid.from_quantize(qt, W, imp)
    np.testing.assert_array_equal(g2.values(), qt.dequantize(qt.quantize(W, imp)))


@pytest.mark.parametrize("name", GRID_TYPES)
def test_project_is_nearest_grid_value(name):
    qt = get(name)
    sp = SPECS[name]
    rng = np.random.default_rng(2)
    bs = sp.block_size
    W = rng.standard_normal((40, bs)).astype(np.float32)
    st = choose_scales(qt, W, None)
    x = (W * rng.uniform(0.5, 1.6, W.shape)).astype(np.float64)   # also beyond the grid's range
    x[0, :4] = [np.inf, -np.inf, 1e30, -1e30]
    for j in range(bs):
        codes, vals = project(x[:, j], st, j, sp)
        allv = st.A[:, j][:, None] * sp.levels[None, :] + st.B[:, j][:, None]     # every grid value
        dist = np.abs(x[:, j][:, None] - allv.astype(np.float64))
        best = dist.min(axis=1)
        k = codes.astype(np.int64) - sp.field_offset
        got = dist[np.arange(40), k]
        ok = np.isfinite(x[:, j])
        np.testing.assert_array_equal(got[ok], best[ok])
        np.testing.assert_array_equal(vals, allv[np.arange(40), k])
    # a full matrix projected at once agrees with column-wise projection
    kk, vv = project_values(sp, x[1:], st.A[1:], st.B[1:])
    assert np.array_equal(vv, st.A[1:] * sp.levels[kk] + st.B[1:])


# ------------------------------------------------------------------------------------------------
# GPTQ against a straightforward float64 implementation
# ------------------------------------------------------------------------------------------------
def gptq_reference(W, H, qtype, importance, damp=0.01, actorder=False) -> LayerGrid:
    """Column by column, no lazy batches, explicit updates of H^-1 (remove the quantized column)."""
    rows, n = W.shape
    H = np.array(H, np.float64)
    dead = np.diag(H) <= 0
    H[dead, :] = 0
    H[:, dead] = 0
    H[dead, dead] = 1
    H += damp * np.mean(np.diag(H)) * np.eye(n)
    perm = np.argsort(-np.diag(np.asarray(H)), kind="stable") if actorder else np.arange(n)
    inv = np.argsort(perm)
    Hinv = torch.linalg.inv(torch.from_numpy(H[np.ix_(perm, perm)])).numpy()
    Wp = np.array(W, np.float64)[:, perm]
    g = LayerGrid(qtype, rows, n)
    gs = g.spec.block_size
    imp = _importance(np.asarray(H), importance)
    for p in range(n):
        col = perm[p]
        b = col // gs
        if not g.chosen[b]:                     # scales from the current (updated) weights of the block
            g.choose(b, Wp[:, inv[b * gs:(b + 1) * gs]], imp[b * gs:(b + 1) * gs])
        q = g.project_col(Wp[:, p], col).astype(np.float64)
        err = (Wp[:, p] - q) / Hinv[p, p]
        Wp[:, p + 1:] -= np.outer(err, Hinv[p, p + 1:])
        # H^-1 of the remaining columns (only the trailing block is used from here on)
        Hinv[p + 1:, p + 1:] -= np.outer(Hinv[p + 1:, p], Hinv[p, p + 1:]) / Hinv[p, p]
    return g


@pytest.mark.parametrize("actorder", [False, True])
@pytest.mark.parametrize("name", GRID_TYPES)
def test_gptq_matches_float64_reference(name, actorder):
    qt = get(name)
    n = ncols(name)
    W, H = layer(8, n, seed=3)
    imp = np.diag(H).astype(np.float32) * np.random.default_rng(0).uniform(0.5, 2.0, n).astype(np.float32)
    ref = gptq_reference(W, H, qt, imp, actorder=actorder)
    # float64 working precision, lazy batches smaller than the matrix: the same codes and scales
    g64 = gptq_quantize(W, H, qt, imp, blocksize=64, actorder=actorder, dtype=np.float64)
    np.testing.assert_array_equal(g64.k, ref.k)
    for k in ref.scale:
        np.testing.assert_array_equal(g64.scale[k], ref.scale[k])
    # float32 working precision: (nearly) the same loss
    g32 = gptq_quantize(W, H, qt, imp, blocksize=64, actorder=actorder)
    l_ref = layer_loss(W, ref.values(), H)
    l32 = layer_loss(W, g32.values(), H)
    assert abs(l32 - l_ref) <= 2e-3 * l_ref, (l32, l_ref)
    assert (g32.k != ref.k).mean() < 0.01


@pytest.mark.parametrize("name", GRID_TYPES)
def test_gptq_beats_rtn(name):
    qt = get(name)
    n = ncols(name)
    W, H = layer(32, n, seed=4, outliers=True)
    imp = np.diag(H).astype(np.float32)
    g = gptq_quantize(W, H, qt)
    ga = gptq_quantize(W, H, qt, actorder=True)
    data = g.pack()
    np.testing.assert_array_equal(qt.dequantize(data), g.values())
    lo, hi = FIELD_RANGE[name]
    q = qt.unpack(data)["q"]
    assert q.min() >= lo and q.max() <= hi
    l_gptq = layer_loss(W, g.values(), H)
    l_act = layer_loss(W, ga.values(), H)
    l_rtn = layer_loss(W, qt.dequantize(qt.quantize(W)), H)
    l_imp = layer_loss(W, qt.dequantize(qt.quantize(W, imp)), H)
    assert l_gptq < 0.8 * l_imp and l_gptq < 0.8 * l_rtn, (l_gptq, l_imp, l_rtn)
    assert l_act < 0.8 * l_imp, (l_act, l_imp)


def test_gptq_dead_columns_and_method():
    qt = get("Q4_K")
    W, H = layer(16, 256, seed=5)
    H[7, :] = 0
    H[:, 7] = 0
    H[100, :] = 0
    H[:, 100] = 0
    g = gptq_quantize(W, H, qt)
    v = g.values()
    assert np.isfinite(v).all()
    # dead inputs: weights kept (rounded onto the grid), not zeroed
    assert np.abs(v[:, 7] - W[:, 7]).max() < 0.5 * np.abs(W[:, 7]).max()
    ctx = QuantContext(grams={"blk.0.attn_q.weight": H})
    m = GPTQ(blocksize=128)
    out = m.quantize_tensor("blk.0.attn_q.weight", W, qt, ctx)
    assert out.dtype == np.uint8 and out.shape == (16, qt.row_bytes(256))
    np.testing.assert_array_equal(qt.dequantize(out), v)
    ll = ctx.extra["layer_loss"]["blk.0.attn_q.weight"]
    assert ll["loss"] < ll["loss_rtn"]
    # no Gram matrix: the importance-weighted quantization of the type, and the name is recorded
    out2 = m.quantize_tensor("token_embd.weight", W, qt, ctx)
    np.testing.assert_array_equal(out2, qt.quantize(W))
    assert ctx.extra["fallback"] == ["token_embd.weight"]


# ------------------------------------------------------------------------------------------------
# target="fp": the float model's layer output as the target (asymmetric calibration)
# ------------------------------------------------------------------------------------------------
def test_fp_target_weights_is_the_least_squares_solution():
    from qgguf.quantize.blockwise import fp_target_weights
    rng = np.random.default_rng(0)
    Xfp = rng.standard_normal((600, 24))
    Xq = Xfp + 0.1 * rng.standard_normal(Xfp.shape)        # the quantized model's (perturbed) inputs
    W = rng.standard_normal((10, 24))
    H, C = Xq.T @ Xq, Xq.T @ Xfp
    got = fp_target_weights(W, H, C, damp=0.0)
    ref = np.linalg.lstsq(Xq, Xfp @ W.T, rcond=None)[0].T
    assert np.allclose(got, ref, rtol=1e-4, atol=1e-4)
    # it matches the float outputs better than W itself does on the perturbed inputs
    err = lambda V: np.linalg.norm(Xq @ V.T - Xfp @ W.T)   # noqa: E731
    assert err(got) < err(W)
    # equal inputs: the weights themselves (up to the damping)
    assert np.allclose(fp_target_weights(W, Xfp.T @ Xfp, Xfp.T @ Xfp, damp=0.0), W, atol=1e-6)
    with pytest.raises(Exception):
        GPTQ(target="float")


def test_gptq_fp_target_end_to_end(tmp_path):
    from pathlib import Path

    from qgguf.convert.pipeline import convert
    stories = Path("/work/shared/models/stories260K.gguf")
    c4 = Path("/work/shared/data/c4-sample-1000.jsonl")
    if not (stories.is_file() and c4.is_file()):
        pytest.skip("shared data missing")
    a, b = tmp_path / "q.gguf", tmp_path / "fp.gguf"
    kw = dict(method="gptq", type="Q4_0", pure=True, calib=c4, nsamples=8, seqlen=64, progress=False)
    convert(stories, a, **kw)
    rep = convert(stories, b, method_options={"target": "fp"}, **kw)
    assert "target=fp" in rep.method
    assert a.read_bytes() != b.read_bytes()


@pytest.mark.parametrize("method,given,expected", [("gptq", None, 64), ("gptq", 16, 16), ("quantease", None, 128)])
def test_calibration_size_defaults(tmp_path, monkeypatch, method, given, expected):
    """GPTQ calibrates on 64 x 512 tokens unless --nsamples says otherwise (its 5-minute budget on SmolLM2);
    the other error-feedback methods keep 128."""
    from pathlib import Path

    from qgguf.convert.pipeline import convert
    from qgguf.quantize import blockwise

    class Seen(Exception):
        pass

    def fake_run_blocks(*a, nsamples=None, seqlen=None, **kw):
        raise Seen((nsamples, seqlen))

    monkeypatch.setattr(blockwise, "run_blocks", fake_run_blocks)
    stories = Path(__file__).resolve().parents[2] / "shared" / "models" / "stories260K.gguf"
    with pytest.raises(Seen) as e:
        convert(stories, tmp_path / "o.gguf", method=method, type="Q8_0", calib="self", nsamples=given,
                progress=False)
    assert e.value.args[0] == (expected, 512)
    assert not (tmp_path / "o.gguf").exists()
