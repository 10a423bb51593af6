"""``--method quantease``: QuantEase (Behdin et al., 2023), cyclic coordinate descent onto llama.cpp's grids.

Objective, for a linear layer with calibration inputs ``X`` and ``H = X^T X``::

    f(Q) = ||X W^T - X Q^T||^2 = tr((Q - W) H (Q - W)^T)

Rows are independent; for one weight ``q_rj`` with all the others fixed, ``f`` is a 1-D quadratic with
curvature ``H_jj``. Writing ``D = Q - W`` and ``P = D H`` (kept up to date), its minimiser is::

    u_rj = q_rj - P_rj / H_jj            (d/dq_rj f = 2 P_rj; the j term of P_rj is D_rj H_jj)

and, since the objective in ``q_rj`` is ``H_jj (q_rj - u_rj)^2 + const``, the best grid value is the grid
value *nearest* to ``u_rj`` (:func:`qgguf.quantize.grid._nearest`; exact). A change ``delta`` of ``q_rj``
updates ``P_r += delta * H_j`` (O(ncols)), so a pass over all columns costs O(rows * ncols^2) at most, and
only O(rows * ncols) plus O(ncols) per *changed* code in practice (after the first pass few codes change).
No matrix is inverted. Every coordinate step is an exact minimisation, so ``f`` never increases.

Passes (default 20): a numba sweep over all columns (rows in parallel); ``P`` is kept exact by the
sweep's float64 rank-1 updates and recomputed with a matrix product every 5 passes. Every ``rescale``
passes (default 4; re-scaling costs about as much as a sweep, for little gain when done more often) the
block scales are re-chosen for the current iterate: for each block, the type's own importance-weighted
llama.cpp search is run on the coordinate-wise optima ``u`` of the last sweep, the targets are rounded onto
the new grid, and the new scales+codes are kept for the rows whose loss (evaluated exactly with ``H``)
goes down - so re-scaling never increases ``f`` either.

Start: ``init="rtn"`` (the type's importance-weighted llama.cpp quantization) or ``init="gptq"`` (GPTQ,
:mod:`.gptq`; QuantEase then only improves on it).

Outlier-aware variant (``outliers=s``, a fraction of the weights, e.g. 0.01)::

    W_hat = Q + S,   Q on the grid (dense, the type's bytes),   S sparse with float16 values

``S`` is *added* to the dequantized dense matrix. A sweep updates, at each position, either the dense
code (positions outside the support, target as above) or the sparse value (positions in the support:
``s_rj = fp16(q_rj + s_rj - P_rj/H_jj - q_rj)``, the dense code there is held at the grid value nearest 0
and the position is left out of the scale search, so outliers no longer stretch the blocks' ranges).
After the first pass and then every ``rescale`` passes (4 if 0) the support is re-chosen: the
``k = s * rows * ncols`` positions (over the whole matrix) with the largest gain
``H_jj (u_rj - nearest_grid(u_rj))^2`` of being free rather than on the grid; positions entering it keep
their value (moved into ``S``), positions leaving it go to the nearest grid value; the proposal is followed by a sweep and undone if the loss went up. The update of the sparse part
goes into ``S`` only: the dense part always lies exactly on the grid.

The sparse part is handed to the caller in ``ctx.extra["outliers"][name] = (idx, vals)``: ``idx`` int32,
flat positions ``row * ncols + col`` in increasing order, ``vals`` float16; the layer's weight is
``qtype.dequantize(bytes) + scatter(idx, vals)`` (values *added* at those positions).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numba
import numpy as np
import torch

from ..errors import OptionError, QggufError
from ..gguf_types.search import fp16_round
from ..runtime.threads import torch_threads
from .base import Method, QuantContext
from .gptq import _importance, as_bool, error_feedback_inputs, gptq_quantize, option, prepare_hessian
from .grid import LayerGrid, _nearest, choose_scales, layer_loss, project_values

_F16_MAX = 65504.0


@numba.njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def _cd_sweep(W, Q, S, M, P, H, Hd, A, B, levels, uniform, center, kmax, K, U, use_sparse):
    """One cyclic pass over the columns, rows in parallel. Q/S/K/P/U are updated in place.

    W, P: float64 (rows, n); Q, S, A, B: float32 (rows, n); M: bool (rows, n); H: float64 (n, n);
    Hd: float64 (n,) = diag(H) > 0; K: int16 codes; U: float64 out, the coordinate-wise optimum (0 at
    positions of the sparse support)."""
    rows, n = Q.shape
    for r in numba.prange(rows):
        for j in range(n):
            hjj = Hd[j]
            q = np.float64(Q[r, j])
            if use_sparse and M[r, j]:
                s = np.float64(S[r, j])
                u = q + s - P[r, j] / hjj
                U[r, j] = 0.0
                t = u - q
                if t > _F16_MAX:
                    t = _F16_MAX
                elif t < -_F16_MAX:
                    t = -_F16_MAX
                s_new = fp16_round(np.float32(t))
                dl = np.float64(s_new) - s
                if dl != 0.0:
                    S[r, j] = s_new
                    for c in range(n):
                        P[r, c] += dl * H[j, c]
            else:
                u = q - P[r, j] / hjj
                U[r, j] = u
                k, v = _nearest(u, A[r, j], B[r, j], levels, uniform, center, kmax)
                dl = np.float64(v) - q
                if dl != 0.0:
                    Q[r, j] = v
                    K[r, j] = k
                    for c in range(n):
                        P[r, c] += dl * H[j, c]


def _fp16(x: np.ndarray) -> np.ndarray:
    return np.clip(x, -_F16_MAX, _F16_MAX).astype(np.float16).astype(np.float32)


def _mm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (torch.from_numpy(np.ascontiguousarray(a)) @ torch.from_numpy(np.ascontiguousarray(b))).numpy()


@dataclass
class QuantEaseResult:
    grid: LayerGrid                      # the dense part (``grid.pack()``: the type's bytes)
    sparse: tuple[np.ndarray, np.ndarray] | None   # (idx int32 row*ncols+col, vals float16) or None
    loss: float                          # final tr(dW H dW^T) (with the H the objective used)
    loss_init: float
    history: list[tuple[str, float]] = field(default_factory=list)   # (step, loss) after every step

    def values(self) -> np.ndarray:
        """float32 (rows, ncols): dense values plus the sparse part."""
        v = self.grid.values()
        if self.sparse is not None:
            idx, vals = self.sparse
            v.reshape(-1)[idx] += vals.astype(np.float32)
        return v


class _State:
    """The iterate: grid (codes/scales), dense values Q, sparse S/M, and P = (Q + S - W) H."""

    def __init__(self, W, H, grid: LayerGrid):
        self.W, self.H = W, H
        self.grid = grid
        self.Q = grid.values()
        self.S = np.zeros_like(self.Q)
        self.M = np.zeros(self.Q.shape, bool)
        self.refresh()

    def refresh(self) -> float:
        """Recompute P exactly (a matrix product) and the loss."""
        D = self.Q.astype(np.float64) + self.S - self.W
        self.P = _mm(D, self.H)
        self.loss = float(np.einsum("ij,ij->", D, self.P))
        return self.loss

    def update_loss(self) -> float:
        """The loss from the incrementally updated P (O(rows*ncols))."""
        D = self.Q.astype(np.float64) + self.S - self.W
        self.loss = float(np.einsum("ij,ij->", D, self.P))
        return self.loss

    def save(self):
        g = self.grid
        return (g.A.copy(), g.B.copy(), g.k.copy(), {k: v.copy() for k, v in g.scale.items()},
                self.Q.copy(), self.S.copy(), self.M.copy(), self.P.copy(), self.loss)

    def restore(self, saved) -> None:
        g = self.grid
        A, B, k, sc, self.Q, self.S, self.M, self.P, self.loss = saved
        g.A[...], g.B[...], g.k[...] = A, B, k
        for name, v in sc.items():
            g.scale[name][...] = v


def quantease_quantize(W: np.ndarray, H: np.ndarray, qtype, importance: np.ndarray | None = None,
                       passes: int = 20, init="rtn", damp: float = 0.0, outliers: float = 0.0,
                       rescale: bool | int = 4, gptq_options: dict | None = None) -> QuantEaseResult:
    """QuantEase of ``W`` (rows, ncols) against ``H`` (ncols, ncols) onto ``qtype``'s grid.

    ``init``: "rtn", "gptq" or a :class:`LayerGrid` to start from; ``damp``: fraction of mean(diag H)
    added to the diagonal of the objective's H (0: the plain layer loss); ``outliers``: fraction of
    weights kept in float16 on top of the grid (0: none); ``rescale``: re-choose block scales between
    passes (``True``: before every pass but the first; an int ``m``: before every ``m``-th pass)."""
    W = np.asarray(W)
    if W.ndim != 2:
        raise QggufError(f"QuantEase needs a matrix, got shape {W.shape}")
    rows, n = W.shape
    H = np.asarray(H)
    if H.shape != (n, n):
        raise QggufError(f"Gram matrix of shape {H.shape} does not match {n} input columns")
    if not np.all(np.isfinite(W)):
        from ..errors import BadWeightsError
        raise BadWeightsError("weights contain NaN or infinite values")
    if not (0.0 <= outliers < 1.0):
        raise OptionError(f"quantease outliers must be a fraction in [0, 1), got {outliers}")
    Hf, _ = prepare_hessian(H, damp)
    Hd = np.ascontiguousarray(np.diag(Hf)).copy()
    imp = _importance(H, importance)
    W64 = np.ascontiguousarray(W, dtype=np.float64)

    if isinstance(init, LayerGrid):
        grid = init.copy()
    elif init == "rtn":
        grid = LayerGrid.from_quantize(qtype, W, imp)
    elif init == "gptq":
        grid = gptq_quantize(W, H, qtype, imp, **(gptq_options or {}))
    else:
        raise OptionError(f"quantease init must be 'rtn' or 'gptq', got {init!r}")
    if grid.rows != rows or grid.ncols != n:
        raise QggufError("initial grid does not match the weight's shape")

    st = _State(W64, Hf, grid)
    sp = grid.spec
    levels, kmax = sp.levels, sp.nlevels - 1
    U = np.zeros((rows, n), np.float64)
    use_sparse = outliers > 0
    nout = int(round(outliers * rows * n)) if use_sparse else 0
    history: list[tuple[str, float]] = [("init", st.loss)]
    loss_init = st.loss

    def sweep(tag: str) -> None:
        _cd_sweep(W64, st.Q, st.S, st.M, st.P, Hf, Hd, grid.A, grid.B, levels, sp.uniform, sp.center, kmax,
                  grid.k, U, use_sparse)
        # P is kept exact by the sweep's rank-1 updates (float64); recompute it now and then anyway
        if exact:
            st.refresh()
        else:
            st.update_loss()
        if tag:
            history.append((tag, st.loss))

    npass = max(0, int(passes))
    every = int(rescale) if not isinstance(rescale, bool) else (1 if rescale else 0)
    sup_every = every or 4
    for it in range(npass):
        exact = it % 5 == 4 or it == npass - 1
        # the support is chosen after the first pass, then re-chosen (and the scales re-fitted) every few
        if nout > 0 and (it == 1 or (it > 0 and it % sup_every == 0)):
            saved = st.save()
            before = st.loss
            _update_support(st, nout, Hd, U)
            sweep("")
            if st.loss > before:          # a proposal that made things worse is undone
                st.restore(saved)
            else:
                history.append((f"support {it}", st.loss))
        if it > 0 and every and (it % every == 0 or (nout > 0 and it == 1)):
            _rescale(st, qtype, imp, U)
            history.append((f"rescale {it}", st.loss))
        sweep(f"pass {it}")

    sparse = None
    if use_sparse:
        idx = np.flatnonzero(st.M.reshape(-1)).astype(np.int32)
        sparse = (idx, st.S.reshape(-1)[idx].astype(np.float16))
    return QuantEaseResult(grid, sparse, st.loss, loss_init, history)


def _update_support(st: _State, nout: int, Hd: np.ndarray, U: np.ndarray) -> None:
    """Re-choose the sparse support (the ``nout`` positions that gain most from being free)."""
    g = st.grid
    tot = st.Q.astype(np.float64) + st.S
    u = tot - st.P / Hd
    kv, v = project_values(g.spec, u, g.A, g.B)
    score = Hd * (u - v) ** 2
    flat = score.reshape(-1)
    top = np.argpartition(-flat, nout - 1)[:nout] if nout < flat.size else np.arange(flat.size)
    newM = np.zeros(flat.size, bool)
    newM[top] = True
    newM = newM.reshape(st.M.shape)
    leave = st.M & ~newM
    enter = newM & ~st.M
    if leave.any():                      # back onto the grid, at the grid value nearest the optimum
        st.Q[leave] = v[leave]
        g.k[leave] = kv[leave]
        st.S[leave] = 0.0
    if enter.any():                      # keep the value: dense code nearest 0, the rest into S
        k0, v0 = project_values(g.spec, np.zeros(int(enter.sum())), g.A[enter], g.B[enter])
        st.Q[enter] = v0
        g.k[enter] = k0
        st.S[enter] = _fp16(tot[enter] - v0)
    st.M = newM
    U[newM] = 0.0
    st.refresh()


def _rescale(st: _State, qtype, imp: np.ndarray, U: np.ndarray) -> None:
    """Re-choose every block's scales from the sweep's coordinate optima ``U``; keep them per row when the
    loss goes down."""
    g = st.grid
    H = st.H
    for b in range(g.nb):
        sl = g.cols(b)
        T = U[:, sl]
        cand = choose_scales(qtype, T, imp[sl])
        kc, vc = project_values(g.spec, T, cand.A, cand.B)
        Qo = st.Q[:, sl]
        So = st.S[:, sl]
        Sn = So
        if st.M.any():
            Mb = st.M[:, sl]
            Sn = np.where(Mb, _fp16(Qo.astype(np.float64) + So - vc), 0.0).astype(np.float32)
        e = (vc.astype(np.float64) + Sn) - (Qo.astype(np.float64) + So)
        Hbb = H[sl, sl]
        dl = 2.0 * np.einsum("ij,ij->i", e, st.P[:, sl]) + np.einsum("ij,ij->i", _mm(e, Hbb), e)
        acc = dl < -1e-12 * max(st.loss, 1e-300) / max(g.rows, 1)
        if not acc.any():
            continue
        g.set_scales(b, cand, acc)
        g.k[acc, sl] = kc[acc]
        st.Q[acc, sl] = vc[acc]
        st.S[acc, sl] = Sn[acc]
        st.P[acc] += _mm(e[acc], H[sl, :])
    st.update_loss()


class QuantEase(Method):
    """QuantEase; needs ``ctx.grams[name]`` (H = X^T X of the layer's inputs).

    Options: ``passes`` (20), ``init`` ("rtn" | "gptq"), ``outliers`` (0: none; e.g. 0.01), ``damp`` (0:
    added to the objective's diagonal, a ridge towards ``W``), ``rescale`` (4: re-choose scales before every
    4th pass; 0: never), ``gptq_damp``/``blocksize``/``actorder`` for the GPTQ start. The sparse part (when
    ``outliers > 0``) goes to ``ctx.extra["outliers"][name] = (idx int32, vals float16)`` (see the module
    docstring); the pipeline must store it, or the layer is only its dense part. Without a Gram matrix (or
    for a type with no grid) a tensor is quantized as the ``imatrix`` method does and listed in
    ``ctx.extra["fallback"]``. Layer losses go to ``ctx.extra["layer_loss"][name]``."""

    name = "quantease"
    needs_calibration = True

    def __init__(self, passes: int = 20, init: str = "rtn", outliers: float = 0.0, damp: float = 0.0,
                 rescale: int = 4, gptq_damp: float = 0.01, blocksize: int = 128, actorder: bool = False,
                 target: str = "q", **_):
        from .gptq import check_target
        self.target = check_target(target)
        self.needs_fp_inputs = self.target == "fp"
        if int(passes) < 0:
            raise OptionError(f"quantease passes must be >= 0, got {passes}")
        if init not in ("rtn", "gptq"):
            raise OptionError(f"quantease init must be 'rtn' or 'gptq', got {init!r}")
        if not (0.0 <= float(outliers) < 1.0):
            raise OptionError(f"quantease outliers must be a fraction in [0, 1), got {outliers}")
        self.passes, self.init, self.outliers = int(passes), init, float(outliers)
        self.damp, self.rescale = float(damp), int(rescale)
        self.gptq_options = {"damp": float(gptq_damp), "blocksize": int(blocksize), "actorder": as_bool(actorder)}

    def describe(self) -> str:
        t = ", target=fp" if self.target == "fp" else ""
        return f"quantease(passes={self.passes}, init={self.init}, outliers={self.outliers}{t})"

    def quantize_tensor(self, name: str, w: np.ndarray, qtype, ctx: QuantContext) -> np.ndarray:
        H, imp, packed = error_feedback_inputs(name, w, qtype, ctx)
        if packed is not None:
            return packed
        H = np.asarray(H)
        with torch_threads(ctx.threads):
            res = quantease_quantize(
                w, H, qtype, imp, passes=option(self, ctx, "passes", self.passes, int),
                init=option(self, ctx, "init", self.init, str), damp=option(self, ctx, "damp", self.damp, float),
                outliers=option(self, ctx, "outliers", self.outliers, float),
                rescale=option(self, ctx, "rescale", self.rescale, int), gptq_options=self.gptq_options)
        if res.sparse is not None:
            ctx.extra.setdefault("outliers", {})[name] = res.sparse
        ctx.extra.setdefault("layer_loss", {})[name] = {
            "method": "quantease", "loss": layer_loss(w, res.values(), H), "loss_init": res.loss_init}
        return res.grid.pack()


__all__ = ["QuantEase", "QuantEaseResult", "quantease_quantize"]
