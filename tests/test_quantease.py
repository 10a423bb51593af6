"""quantize.quantease: the coordinate step is the exact 1-D minimum over the grid, the loss never goes up,
QuantEase improves on GPTQ, and the outlier-aware variant keeps its dense part on the grid."""
from __future__ import annotations

import numpy as np
import pytest

from qgguf.gguf_types import get
from qgguf.quantize.base import QuantContext
from qgguf.quantize.gptq import gptq_quantize
from qgguf.quantize.grid import GRID_TYPES, SPECS, LayerGrid, layer_loss, project_values
from qgguf.quantize.quantease import QuantEase, _cd_sweep, quantease_quantize

from _shared import KQ, correlated_layer, ncols, one_torch_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def layer(rows: int, n: int, seed: int = 0, tokens: int = 512, outliers: bool = True):
    return correlated_layer(rows, n, seed=seed, tokens=tokens, outliers=outliers)


def _sweep(W, H, g: LayerGrid, S=None, M=None):
    """Run one sweep of the kernel on copies; return (Q, S) after it."""
    sp = g.spec
    Q = g.values()
    S = np.zeros_like(Q) if S is None else S.copy()
    M = np.zeros(Q.shape, bool) if M is None else M
    W64 = np.asarray(W, np.float64)
    P = (Q.astype(np.float64) + S - W64) @ H
    U = np.zeros_like(P)
    K = g.k.copy()
    _cd_sweep(W64, Q, S, M, P, H, np.diag(H).copy(), g.A.copy(), g.B.copy(), sp.levels, sp.uniform, sp.center,
              sp.nlevels - 1, K, U, bool(M.any()))
    np.testing.assert_array_equal(g.A * sp.levels[K] + g.B, Q)      # values and codes stay consistent
    return Q, S


@pytest.mark.parametrize("name", GRID_TYPES)
def test_coordinate_step_is_the_best_grid_value(name):
    """The first column of a sweep sees all other columns at their start values: its new value must be
    the grid value (of all the type's codes for that weight) that minimises the full layer loss."""
    qt = get(name)
    sp = SPECS[name]
    n = ncols(name)
    W, H = layer(6, n, seed=1)
    rng = np.random.default_rng(7)
    start = LayerGrid.from_quantize(qt, W + 0.02 * rng.standard_normal(W.shape).astype(np.float32))
    for j in (0, 5, n // 2 + 3, n - 1):
        perm = np.r_[j, np.delete(np.arange(n), j)]            # column j first
        Wp, Hp = W[:, perm], H[np.ix_(perm, perm)]
        g = LayerGrid(qt, 6, n)
        g.A[...], g.B[...], g.k[...] = start.A[:, perm], start.B[:, perm], start.k[:, perm]
        Q0 = g.values().astype(np.float64)
        Q, _ = _sweep(Wp, Hp, g)
        for r in range(6):
            cand = g.A[r, 0] * sp.levels + g.B[r, 0]            # every grid value of weight (r, j)
            d = np.repeat((Q0[r] - Wp[r])[None, :], sp.nlevels, axis=0)
            d[:, 0] = cand.astype(np.float64) - Wp[r, 0]
            losses = np.einsum("ki,ij,kj->k", d, Hp, d)
            assert Q[r, 0] in cand
            got = losses[np.flatnonzero(cand == Q[r, 0])].min()
            # the best code (up to float64 rounding of the full loss; ties between equal values allowed)
            assert got - losses.min() <= 1e-12 * losses.min(), (r, j, got, losses.min())


def test_sparse_coordinate_step_is_the_best_float16():
    qt = get("Q4_0")
    W, H = layer(4, 64, seed=2)
    g = LayerGrid.from_quantize(qt, W)
    M = np.zeros(W.shape, bool)
    M[:, 0] = True
    S = np.zeros(W.shape, np.float32)
    Q0 = g.values().astype(np.float64)
    Q, S1 = _sweep(W, H, g, S, M)
    np.testing.assert_array_equal(Q[:, 0], Q0[:, 0])          # the dense code at a sparse position is held
    for r in range(4):
        s = np.float16(S1[r, 0])
        for cand in (s, np.nextafter(s, np.float16(np.inf)), np.nextafter(s, np.float16(-np.inf))):
            d = Q0[r] - W[r]
            d[0] = Q0[r, 0] + float(cand) - W[r, 0]
            dbest = Q0[r] - W[r]
            dbest[0] = Q0[r, 0] + float(s) - W[r, 0]
            assert dbest @ H @ dbest <= d @ H @ d * (1 + 1e-12)


def _monotone(history):
    losses = [l for _, l in history]
    return all(b <= a * (1 + 1e-9) + 1e-12 for a, b in zip(losses, losses[1:]))


@pytest.mark.parametrize("name", GRID_TYPES)
def test_loss_never_increases_and_beats_gptq(name):
    qt = get(name)
    n = ncols(name)
    W, H = layer(16, n, seed=3)
    res = quantease_quantize(W, H, qt, passes=6, rescale=2)
    assert _monotone(res.history), res.history
    np.testing.assert_array_equal(qt.dequantize(res.grid.pack()), res.grid.values())
    assert abs(layer_loss(W, res.grid.values(), H) - res.loss) <= 1e-6 * res.loss
    l_rtn = layer_loss(W, qt.dequantize(qt.quantize(W, np.diag(H).astype(np.float32))), H)
    assert res.loss < l_rtn
    # started from GPTQ: never worse than GPTQ
    g = gptq_quantize(W, H, qt)
    l_gptq = layer_loss(W, g.values(), H)
    res2 = quantease_quantize(W, H, qt, passes=6, init=g)
    assert _monotone(res2.history)
    assert abs(res2.history[0][1] - l_gptq) <= 1e-9 * l_gptq
    assert res2.loss <= l_gptq * (1 + 1e-9)
    res3 = quantease_quantize(W, H, qt, passes=6, init="gptq")
    assert res3.loss <= l_gptq * (1 + 1e-9)


@pytest.mark.parametrize("name", ["Q4_0", "IQ4_NL", "Q5_1", "Q3_K", "Q4_K", "Q6_K"])
def test_outliers_dense_part_on_grid_and_lower_loss(name):
    qt = get(name)
    n = ncols(name)
    rows = 16
    W, H = layer(rows, n, seed=4)
    base = quantease_quantize(W, H, qt, passes=8, init="gptq")
    res = quantease_quantize(W, H, qt, passes=8, init="gptq", outliers=0.02)
    assert _monotone(res.history)
    idx, vals = res.sparse
    assert idx.dtype == np.int32 and vals.dtype == np.float16
    assert len(idx) == round(0.02 * rows * n) and np.all(np.diff(idx) > 0)
    assert idx.min() >= 0 and idx.max() < rows * n and np.isfinite(vals).all()
    # the dense part lies exactly on the grid: its bytes give back its values
    dense = res.grid.values()
    np.testing.assert_array_equal(qt.dequantize(res.grid.pack()), dense)
    # the sparse update went into S: dense codes at outlier positions sit at the grid value nearest 0
    M = np.zeros(rows * n, bool)
    M[idx] = True
    M = M.reshape(rows, n)
    _, v0 = project_values(res.grid.spec, np.zeros(int(M.sum())), res.grid.A[M], res.grid.B[M])
    np.testing.assert_array_equal(dense[M], v0)
    full = dense.copy()
    full.reshape(-1)[idx] += vals.astype(np.float32)
    l_full = layer_loss(W, full, H)
    assert abs(l_full - res.loss) <= 1e-5 * res.loss
    assert l_full < base.loss, (l_full, base.loss)


def test_method_interface():
    qt = get("Q4_K")
    W, H = layer(8, 256, seed=5)
    name = "blk.0.ffn_up.weight"
    ctx = QuantContext(grams={name: H})
    out = QuantEase(passes=4).quantize_tensor(name, W, qt, ctx)
    assert out.shape == (8, qt.row_bytes(256)) and "outliers" not in ctx.extra
    l0 = ctx.extra["layer_loss"][name]["loss"]
    assert abs(layer_loss(W, qt.dequantize(out), H) - l0) <= 1e-6 * l0
    out2 = QuantEase(passes=4, init="gptq", outliers=0.01).quantize_tensor(name, W, qt, ctx)
    idx, vals = ctx.extra["outliers"][name]
    full = qt.dequantize(out2)
    full.reshape(-1)[idx] += vals.astype(np.float32)
    assert layer_loss(W, full, H) < l0
    out3 = QuantEase().quantize_tensor("token_embd.weight", W, qt, ctx)
    np.testing.assert_array_equal(out3, qt.quantize(W))
    assert ctx.extra["fallback"] == ["token_embd.weight"]
