"""``--method gptq``: GPTQ (Frantar et al., 2022) onto llama.cpp's block formats.

For a linear layer ``y = x W^T`` with calibration inputs ``X`` (tokens x ncols) and ``H = X^T X``, GPTQ
minimises ``tr((W - Q) H (W - Q)^T)`` greedily, column by column: each column is rounded onto its block's
grid and the rounding error is spread over the columns not yet quantized with the inverse Hessian (the
Optimal Brain Surgeon update), using the upper Cholesky factor ``U`` of ``H^-1`` (``H^-1 = U^T U``):

    err = (w_j - q_j) / U_jj;   W[:, k] -= err * U_jk   (k > j)

Details:

* damping: ``H += damp * mean(diag H) * I`` (default 0.01); if the Cholesky factorisation still fails,
  the damping is multiplied by 10 and tried again;
* dead columns (``H_jj == 0``: inputs that were always zero in the calibration data) get ``H_jj = 1`` and
  no coupling; their weights are kept (rounded to the nearest grid value) rather than zeroed as in the
  reference code, since the calibration text may just not have exercised them;
* lazy batch updates: columns are processed in batches of ``blocksize`` (default 128, rounded up to a
  multiple of the type's block: 256 for the k-quants) with rank-1 updates inside the batch and one
  matrix product for the rest of the matrix at its end;
* scales: chosen on the fly at each block boundary, from the weights *as updated by then* (all the error
  feedback of the earlier columns), by the type's own importance-weighted llama.cpp search
  (:func:`qgguf.quantize.grid.choose_scales`); the importance vector is ``ctx.importance[name]`` when
  given, else ``diag(H)``;
* act-order (``actorder=True``): columns are processed in order of descending ``diag(H)``. The block
  structure of the file is fixed (a block is 32/256 *consecutive* columns), so a block's scales are chosen
  the first time one of its columns is reached in the permuted order, from the current values of all its
  columns, including the pending (not yet applied) lazy-batch updates. This keeps the "scales from the
  updated weights" behaviour of the natural order; "static groups" (all scales chosen from the original
  weights up front) would ignore the error feedback for every block.

The working arithmetic is float32 (``dtype``; float64 for tests); ``H^-1`` and its Cholesky factor are
computed in float64.
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import OptionError, QggufError
from ..runtime.threads import torch_threads
from .base import Method, QuantContext
from .grid import LayerGrid, layer_loss, spec_of, supports


def prepare_hessian(H: np.ndarray, damp: float) -> tuple[np.ndarray, np.ndarray]:
    """(damped float64 H with dead columns fixed, dead mask)."""
    H = np.array(H, dtype=np.float64, copy=True)
    n = H.shape[0]
    if H.shape != (n, n):
        raise QggufError(f"Gram matrix must be square, got {H.shape}")
    if not np.all(np.isfinite(H)):
        raise QggufError("Gram matrix has non-finite values")
    H = 0.5 * (H + H.T)
    diag = np.diag(H).copy()
    dead = ~(diag > 0)
    if dead.any():
        H[dead, :] = 0.0
        H[:, dead] = 0.0
        H[dead, dead] = 1.0
    if damp > 0:
        H[np.arange(n), np.arange(n)] += damp * float(np.mean(np.diag(H)))
    return H, dead


def inverse_cholesky(H: np.ndarray, damp: float = 0.01) -> np.ndarray:
    """Upper ``U`` (float64) with ``U^T U = (H + damp*mean(diag)*I)^-1`` (dead columns fixed first); the
    damping is multiplied by 10 while H is not positive definite."""
    Hd, _ = prepare_hessian(H, 0.0)
    Ht0 = torch.from_numpy(Hd)
    mean = float(np.mean(np.diag(Hd)))
    d = damp
    # at most three n x n float64 arrays alive at once (H, and two of Ht / L / Hinv / U): each intermediate is
    # dropped as soon as the next one exists (an 8192-wide ffn_down: 512 MiB each)
    for _ in range(8):
        Ht = Ht0.clone()
        Ht.diagonal().add_(d * mean)
        L, info = torch.linalg.cholesky_ex(Ht)
        del Ht
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            del L
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            del Hinv
            if int(info) == 0 and bool(torch.isfinite(U).all()):
                return U.numpy()
            del U
        else:
            del L
        d = max(d * 10, 1e-6)
    raise QggufError("Gram matrix is not positive definite even with heavy damping")


def _importance(H: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
    imp = np.asarray(importance if importance is not None else np.diag(H), dtype=np.float64).reshape(-1)
    imp = np.where(np.isfinite(imp) & (imp > 0), imp, 0.0)
    m = float(imp.mean()) if imp.size else 0.0
    if m <= 0:
        return np.ones(imp.shape, np.float32)
    imp = imp / m + 1e-6                   # never exactly 0: an all-zero-weight block would give scale 0
    return imp.astype(np.float32)


def gptq_quantize(W: np.ndarray, H: np.ndarray, qtype, importance: np.ndarray | None = None,
                  damp: float = 0.01, blocksize: int = 128, actorder: bool = False,
                  dtype=np.float32) -> LayerGrid:
    """GPTQ of ``W`` (rows, ncols) against Gram matrix ``H`` (ncols, ncols) onto ``qtype``'s grid.

    Returns the :class:`LayerGrid` (``.pack()``: the bytes; ``.values()``: the dequantized matrix)."""
    W = np.asarray(W)
    if W.ndim != 2:
        raise QggufError(f"GPTQ needs a matrix, got shape {W.shape}")
    rows, n = W.shape
    if H.shape != (n, n):
        raise QggufError(f"Gram matrix of shape {H.shape} does not match {n} input columns")
    if not np.all(np.isfinite(W)):
        from ..errors import BadWeightsError
        raise BadWeightsError("weights contain NaN or infinite values")
    grid = LayerGrid(qtype, rows, n)
    gs = grid.spec.block_size
    imp = _importance(H, importance)
    bs = max(int(blocksize), 1)
    bs = gs if bs <= gs else -(-bs // gs) * gs
    if actorder:
        perm = np.argsort(-np.diag(np.asarray(H, np.float64)), kind="stable")
    else:
        perm = np.arange(n)
    inv = np.empty(n, np.int64)
    inv[perm] = np.arange(n)
    # U: the factor of the permuted (damped) H
    tdt = torch.float64 if np.dtype(dtype) == np.float64 else torch.float32
    U = torch.from_numpy(inverse_cholesky(np.asarray(H, np.float64)[np.ix_(perm, perm)] if actorder else H,
                                          damp)).to(tdt)
    Wp = torch.from_numpy(np.asarray(W, np.float64)[:, perm]).to(tdt).contiguous()

    for i1 in range(0, n, bs):
        i2 = min(i1 + bs, n)
        cnt = i2 - i1
        W1 = Wp[:, i1:i2].clone()
        W1n = W1.numpy()
        Err1 = torch.zeros((rows, cnt), dtype=tdt)
        U1 = U[i1:i2, i1:i2]
        for i in range(cnt):
            p = i1 + i
            col = int(perm[p])
            b = col // gs
            if not grid.chosen[b]:
                if not actorder:
                    blk = W1n[:, i:i + gs]
                else:
                    pos = inv[b * gs:(b + 1) * gs]
                    blk = np.empty((rows, gs), np.float64)
                    inside = (pos >= i1) & (pos < i2)
                    blk[:, inside] = W1n[:, pos[inside] - i1]
                    out = ~inside            # beyond the batch (earlier batches' blocks all have scales)
                    if out.any():
                        po = torch.from_numpy(pos[out])
                        blk[:, out] = (Wp[:, po] - Err1[:, :i] @ U[i1:i1 + i][:, po]).numpy()
                grid.choose(b, blk, imp[b * gs:(b + 1) * gs])
            w = W1[:, i]
            q = torch.from_numpy(grid.project_col(W1n[:, i], col)).to(tdt)
            err = (w - q).div_(U1[i, i])
            if i + 1 < cnt:
                W1[:, i + 1:].addr_(err, U1[i, i + 1:], alpha=-1)
            Err1[:, i] = err
        if i2 < n:
            Wp[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1)
    return grid


def as_bool(v) -> bool:
    """An option value as a bool ("1", "true", "yes", "on" / "0", "false", "no", "off" from the command line)."""
    if isinstance(v, str):
        t = v.strip().lower()
        if t in ("1", "true", "yes", "on", "y"):
            return True
        if t in ("0", "false", "no", "off", "n", ""):
            return False
        raise OptionError(f"expected a yes/no value, got {v!r}")
    return bool(v)


def option(method: Method, ctx: QuantContext, key: str, default, conv):
    """``ctx.options["<method>.<key>"]`` or ``ctx.options[key]`` (converted with ``conv``), else ``default``."""
    opts = ctx.options or {}
    v = opts.get(f"{method.name}.{key}", opts.get(key))
    if v is None:
        return default
    try:
        return conv(v)
    except (TypeError, ValueError):
        raise OptionError(f"{method.name} option {key}: bad value {v!r}") from None


def error_feedback_inputs(name: str, w: np.ndarray, qtype, ctx: QuantContext):
    """What an error-feedback method (GPTQ, QuantEase) needs for ``name``: ``(H, importance, None)``; or, when
    it cannot work on this tensor (float type, no Gram matrix, a type without a grid, not 2-D),
    ``(None, None, bytes)`` from the type's own importance-weighted search, the name noted in
    ``ctx.extra["fallback"]``."""
    H = ctx.grams.get(name) if ctx.grams else None
    imp = None if qtype.is_float else ctx.importance_for(name, w.shape[-1])
    if qtype.is_float or H is None or not supports(qtype) or w.ndim != 2:
        if not qtype.is_float:
            ctx.extra.setdefault("fallback", []).append(name)
        return None, None, qtype.quantize(w, imp)
    return H, imp, None


def check_target(target) -> str:
    """``target`` option of the error-feedback methods: ``q`` (each layer's own output on the quantized model's
    inputs, GPTQ as published) or ``fp`` (the float model's layer output: blockwise.fp_target_weights)."""
    t = str(target or "q").lower()
    if t not in ("q", "fp"):
        raise OptionError(f"target must be 'q' or 'fp', got {target!r}")
    return t


class GPTQ(Method):
    """GPTQ with the type's block scales; needs ``ctx.grams[name]`` (H = X^T X of the layer's inputs).

    Options: ``damp`` (0.01), ``blocksize`` (128), ``actorder`` (False), ``target`` ("q"; "fp": quantize the
    weights that map the quantized model's inputs to the float model's outputs, see
    :func:`qgguf.quantize.blockwise.fp_target_weights`; measured worse on SmolLM2-135M Q2_K: KLD 0.540 against
    0.400 for the default, see docs/BENCHMARKS.md). Tensors without a Gram matrix
    (or of a type with no grid) are quantized as the ``imatrix`` method does (the type's own
    importance-weighted search, plain rounding without importance); their names are listed in
    ``ctx.extra["fallback"]``. Per-tensor layer losses go to ``ctx.extra["layer_loss"][name]``
    (``{"method", "loss", "loss_rtn"}``, ``loss = tr(dW H dW^T)``)."""

    name = "gptq"
    needs_calibration = True
    #: calibration preference (``--nsamples`` overrides): 64 x 512 tokens. On SmolLM2-135M Q4_0, 2 cores:
    #: 64 sequences took 269 s (KLD 0.2016 on WikiText-2), 128 took 635 s (KLD 0.1959); the time goes to the
    #: block forward passes and the Gram matrices, both linear in the token count (docs/BENCHMARKS.md)
    nsamples = 64

    def __init__(self, damp: float = 0.01, blocksize: int = 128, actorder: bool = False, target: str = "q", **_):
        self.target = check_target(target)
        self.needs_fp_inputs = self.target == "fp"
        if not (0 <= float(damp) < 10):
            raise OptionError(f"gptq damp must be in [0, 10), got {damp}")
        if int(blocksize) < 1:
            raise OptionError(f"gptq blocksize must be positive, got {blocksize}")
        self.damp, self.blocksize, self.actorder = float(damp), int(blocksize), as_bool(actorder)

    def describe(self) -> str:
        t = ", target=fp" if self.target == "fp" else ""
        return f"gptq(damp={self.damp}, blocksize={self.blocksize}, actorder={self.actorder}{t})"

    def quantize_tensor(self, name: str, w: np.ndarray, qtype, ctx: QuantContext) -> np.ndarray:
        H, imp, packed = error_feedback_inputs(name, w, qtype, ctx)
        if packed is not None:
            return packed
        spec_of(qtype)
        damp = option(self, ctx, "damp", self.damp, float)
        bsz = option(self, ctx, "blocksize", self.blocksize, int)
        act = option(self, ctx, "actorder", self.actorder, as_bool)
        with torch_threads(ctx.threads):
            grid = gptq_quantize(w, np.asarray(H), qtype, imp, damp=damp, blocksize=bsz, actorder=act)
        data = grid.pack()
        if ctx.extra is not None:
            rtn = qtype.dequantize(qtype.quantize(w, imp if imp is not None else _importance(H, None)))
            ctx.extra.setdefault("layer_loss", {})[name] = {
                "method": "gptq", "loss": layer_loss(w, grid.values(), H), "loss_rtn": layer_loss(w, rtn, H)}
        return data


__all__ = ["GPTQ", "check_target", "gptq_quantize", "inverse_cholesky", "prepare_hessian", "as_bool", "option"]
