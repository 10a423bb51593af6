"""The mathematics of VPTQ-style vector quantization (Liu et al., "VPTQ: Extreme Low-bit Vector Post-Training
Quantization for Large Language Models") for one weight matrix, on the CPU.

``W`` (R rows x C columns, numpy orientation (out, in)) is quantized against its calibration Gram matrix
``H = X^T X`` (the objective ``tr((W - What) H (W - What)^T)``), column by column, as in VPTQ:

1. **act-order** (optional): columns are visited by decreasing ``diag(H)`` (``perm``); the first
   ``n_out`` of them - the most salient inputs - are the *outlier* columns, with their own codebook;
2. **column normalisation** (optional): each column is stored as ``z * scale + bias`` (its standard
   deviation and mean over the rows, rounded to float16), the codebooks fit the normalised ``z``;
3. **Hessian-weighted k-means** (:func:`weighted_kmeans`): each column is cut into ``R / v`` vectors of ``v``
   consecutive rows; the codebook of a group of columns is the k-means of its vectors, each weighted by its
   column's ``H[p, p] * scale[p]^2`` (the diagonal of the objective, VPTQ's second-order weighting); the
   residual codebook is the weighted k-means of the vectors' residuals after the main codebook;
4. **channel-independent error feedback** (:func:`gptq_pass`): the columns are quantized one after another
   (nearest centroid, then nearest residual centroid, for each vector of the column) and each column's
   error is spread over the columns not yet quantized through the upper Cholesky factor of ``H^-1``
   (GPTQ's update, lazy in blocks of ``blocksize`` columns), so later columns compensate;
5. a final **centroid update** (optional, ``refit``): every codebook entry is set to the weighted mean of
   the error-fed-back vectors assigned to it (one k-means step on the final targets), kept only if the
   objective improves.

The block-wise fine-tuning of centroids and norms against the block outputs is the AQ method's
(:func:`qgguf.quantize.finetune.finetune_block`, through :class:`VQState`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import torch

from ..errors import OptionError
from .aq_core import _nearest, prepare_gram, relative_error

# ------------------------------------------------------------------------------------------------
# k-means


#: k-means++ initialisation up to this many centroids (it is sequential in k); above: weighted random points
KMEANSPP_MAX_K = 1024


def _kmeanspp(x: torch.Tensor, w: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Weighted k-means++ (Arthur & Vassilvitskii): each next centroid drawn with probability proportional
    to weight x squared distance to the nearest centroid chosen so far."""
    N = x.shape[0]
    c = torch.empty(k, x.shape[1])
    i = int(torch.multinomial(w + 1e-12, 1, generator=gen))
    c[0] = x[i]
    d = ((x - c[0]) ** 2).sum(1)
    for j in range(1, k):
        p = d * w
        tot = float(p.sum())
        i = int(torch.multinomial(p if tot > 0 else torch.ones(N), 1, generator=gen))
        c[j] = x[i]
        d = torch.minimum(d, ((x - c[j]) ** 2).sum(1))
    return c


def weighted_kmeans(x: torch.Tensor, w: torch.Tensor, k: int, iters: int, gen: torch.Generator,
                    max_points: int | None = None) -> torch.Tensor:
    """Weighted Lloyd k-means of the rows of ``x`` (N, d) with point weights ``w`` (N,) >= 0 into ``k``
    centroids (k, d). Init: weighted k-means++ up to :data:`KMEANSPP_MAX_K` centroids, else ``k`` distinct
    points drawn with probability proportional to their weight (fewer points than ``k``: all points, then
    jittered copies). Fitted on at most ``max_points`` points
    drawn uniformly. Empty clusters take the points with the largest weighted distance."""
    N, d = x.shape
    w = w.float().clamp_min(0)
    if max_points is not None and N > max_points:
        sel = torch.randperm(N, generator=gen)[:max_points]
        x, w = x[sel], w[sel]
        N = max_points
    if float(w.sum()) <= 0:
        w = torch.ones(N)
    if N >= k and k <= KMEANSPP_MAX_K:
        c = _kmeanspp(x, w, k, gen)
    elif N >= k:
        p = w + 1e-12 * float(w.max())
        init = torch.multinomial(p, k, replacement=False, generator=gen)
        c = x[init].clone()
    else:
        idx = torch.cat([torch.arange(N), torch.randint(0, N, (k - N,), generator=gen)])
        c = x[idx].clone()
        scale = float(x.std()) if N > 1 else 1.0
        c[N:] += 1e-3 * (scale or 1.0) * torch.randn(k - N, d, generator=gen)
    assign = None
    for _ in range(max(1, int(iters))):
        new, dist = _nearest(x, c)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        sums = torch.zeros(k, d).index_add_(0, assign, x * w[:, None])
        cnt = torch.zeros(k).index_add_(0, assign, w)
        nz = cnt > 0
        c[nz] = sums[nz] / cnt[nz, None]
        empty = torch.nonzero(~nz).flatten()
        if len(empty):
            far = torch.argsort(dist.clamp_min(0) * w, descending=True, stable=True)[: len(empty)]
            c[empty[: len(far)]] = x[far]
    return c


def nearest(z: torch.Tensor, book: torch.Tensor, book_sq: torch.Tensor | None = None) -> torch.Tensor:
    """Index of the nearest row of ``book`` (k, v) for every row of ``z`` (n, v)."""
    bs = (book * book).sum(1) if book_sq is None else book_sq
    return torch.addmm(bs, z, book.T, beta=1, alpha=-2).argmin(1)


# ------------------------------------------------------------------------------------------------
# options and results


@dataclass
class VQOptions:
    actorder: bool = True
    norm: bool = True
    damp: float = 0.01
    blocksize: int = 128
    kmeans_iters: int = 12
    kmeans_points: int | None = 1 << 15
    refit: bool = False


@dataclass
class VQResult:
    """One quantized matrix (positions ``p`` in the permuted order; ``idx`` (nb, C), ``ridx`` (nb, nc))."""
    idx: torch.Tensor
    ridx: torch.Tensor | None
    books: torch.Tensor                 # (G, k, v), float16-exact float32
    rbooks: torch.Tensor | None         # (G, kr, v)
    obook: torch.Tensor | None          # (k, v)
    perm: torch.Tensor                  # (C,) long
    colscale: torch.Tensor              # (C,) float16-exact
    colbias: torch.Tensor               # (C,) float16-exact
    rel_err: float = 0.0
    history: list = field(default_factory=list)
    seconds: float = 0.0


def layout(qt, R: int, C: int) -> dict:
    L = qt.layout((R, C))
    L["grp"] = torch.from_numpy(qt.group_of(C))
    return L


def dequantize(qt, r: VQResult, R: int, C: int, books=None, rbooks=None, obook=None, colscale=None,
               colbias=None) -> torch.Tensor:
    """What (R, C) in the original column order, float32, computed as the format defines it; the float
    arguments override ``r``'s (differentiable: the block fine-tuning)."""
    books = r.books if books is None else books
    rbooks = r.rbooks if rbooks is None else rbooks
    obook = r.obook if obook is None else obook
    s = r.colscale if colscale is None else colscale
    b = r.colbias if colbias is None else colbias
    L = layout(qt, R, C)
    n_out, v, nb = L["n_out"], qt.v, L["nb"]
    grp = L["grp"][n_out:]
    parts = []
    if n_out:
        parts.append(obook[r.idx[:, :n_out]])                         # (nb, n_out, v)
    reg = books[grp[None, :], r.idx[:, n_out:]]                         # (nb, nc, v)
    if qt.kr:
        reg = reg + rbooks[grp[None, :], r.ridx]
    parts.append(reg)
    q = torch.cat(parts, 1) if len(parts) > 1 else parts[0]            # (nb, C, v)
    q = q * s[None, :, None] + b[None, :, None]
    wp = q.permute(0, 2, 1).reshape(nb * v, C)                          # position order
    inv = torch.empty_like(r.perm)
    inv[r.perm] = torch.arange(C)
    return wp[:, inv]


def to_fields(r: VQResult) -> dict:
    f = {"idx": r.idx.numpy().astype(np.uint32), "books": r.books.detach().numpy().astype(np.float16),
         "perm": r.perm.numpy().astype(np.int64), "colscale": r.colscale.detach().numpy().astype(np.float16),
         "colbias": r.colbias.detach().numpy().astype(np.float16)}
    if r.ridx is not None:
        f["ridx"] = r.ridx.numpy().astype(np.uint32)
        f["rbooks"] = r.rbooks.detach().numpy().astype(np.float16)
    if r.obook is not None:
        f["obook"] = r.obook.detach().numpy().astype(np.float16)
    return f


def from_fields(qt, f: dict) -> VQResult:
    t = lambda a: torch.from_numpy(np.asarray(a, np.float32).copy())  # noqa: E731
    return VQResult(idx=torch.from_numpy(np.asarray(f["idx"]).astype(np.int64)),
                    ridx=torch.from_numpy(np.asarray(f["ridx"]).astype(np.int64)) if qt.kr else None,
                    books=t(f["books"]), rbooks=t(f["rbooks"]) if qt.kr else None,
                    obook=t(f["obook"]) if qt.outlier_pct else None,
                    perm=torch.from_numpy(np.asarray(f["perm"]).astype(np.int64)),
                    colscale=t(f["colscale"]).reshape(-1), colbias=t(f["colbias"]).reshape(-1))


def _f16(x: torch.Tensor) -> torch.Tensor:
    return x.half().float()


# ------------------------------------------------------------------------------------------------
# one matrix


def _book_for(p: int, L: dict, books, obook):
    if p < L["n_out"]:
        return obook, -1
    g = int(L["grp"][p])
    return books[g], g


def gptq_pass(Wp: torch.Tensor, U: torch.Tensor, L: dict, v: int, books, rbooks, obook, s, b,
              blocksize: int = 128, collect: bool = False):
    """Quantize the columns of ``Wp`` (R, C; permuted order) one after another with error feedback through
    ``U`` (upper Cholesky factor of H^-1, permuted). Returns (idx (nb, C), ridx (nb, nc) or None, Q (R, C) the
    quantized columns, targets (R, C) the error-fed-back columns when ``collect``)."""
    R, C = Wp.shape
    nb, n_out = R // v, L["n_out"]
    W = Wp.clone()
    Q = torch.zeros_like(W)
    T = torch.zeros_like(W) if collect else None
    idx = torch.empty(nb, C, dtype=torch.long)
    ridx = torch.empty(nb, C - n_out, dtype=torch.long) if rbooks is not None else None
    sq = {}
    for i0 in range(0, C, blocksize):
        i1 = min(C, i0 + blocksize)
        W1 = W[:, i0:i1].clone()
        E1 = torch.zeros_like(W1)
        U1 = U[i0:i1, i0:i1]
        for j in range(i1 - i0):
            p = i0 + j
            w = W1[:, j]
            if collect:
                T[:, p] = w
            book, g = _book_for(p, L, books, obook)
            key = ("o",) if g < 0 else ("b", g)
            if key not in sq:
                sq[key] = (book * book).sum(1)
            z = ((w - b[p]) / s[p]).reshape(nb, v)
            ix = nearest(z, book, sq[key])
            q = book[ix]
            idx[:, p] = ix
            if g >= 0 and rbooks is not None:
                rk = ("r", g)
                if rk not in sq:
                    sq[rk] = (rbooks[g] * rbooks[g]).sum(1)
                rx = nearest(z - q, rbooks[g], sq[rk])
                q = q + rbooks[g][rx]
                ridx[:, p - n_out] = rx
            wq = q.reshape(-1) * s[p] + b[p]
            Q[:, p] = wq
            err = (w - wq) / U1[j, j]
            W1[:, j:] -= err[:, None] * U1[j, j:][None, :]
            E1[:, j] = err
        W[:, i1:] -= E1 @ U[i0:i1, i1:]
    return idx, ridx, Q, T


def _loss(D: torch.Tensor, H: torch.Tensor) -> float:
    return float(((D @ H) * D).double().sum())


def quantize_matrix(W, H, qt, opts: VQOptions | None = None, seed: int = 0,
                    progress: Callable[[str, float], None] | None = None) -> VQResult:
    """VQ of one matrix ``W`` (R, C) against ``H`` (C, C) into type ``qt`` (module docstring)."""
    from .gptq import inverse_cholesky

    t0 = time.perf_counter()
    opts = opts or VQOptions()
    W = torch.as_tensor(np.asarray(W, np.float32)) if not isinstance(W, torch.Tensor) else W.float()
    R, C = W.shape
    if not qt.fits_shape((R, C)):
        raise OptionError(f"{qt.name}: a {R}x{C} matrix does not fit (rows must divide into vectors of {qt.v})")
    L = layout(qt, R, C)
    v, nb, n_out = qt.v, L["nb"], L["n_out"]
    gen = torch.Generator().manual_seed(int(seed) % (2 ** 63))
    Hn = np.asarray(H, np.float64)
    diag = np.diag(Hn).copy()
    perm = np.argsort(-diag, kind="stable") if opts.actorder else np.arange(C)
    permt = torch.from_numpy(perm.astype(np.int64))
    Wp = W[:, permt].contiguous()
    Hp = Hn[np.ix_(perm, perm)]
    Hf = prepare_gram(Hp)                                   # float32, normalised (for losses)
    d = torch.diagonal(Hf).clone()
    if opts.norm:
        b = _f16(Wp.mean(0))
        s = _f16((Wp - b).pow(2).mean(0).sqrt().clamp_min(1e-8))
        s = torch.where(s > 0, s, torch.ones_like(s))
    else:
        b, s = torch.zeros(C), torch.ones(C)
    Z = (Wp - b) / s                                        # normalised, position order
    # vectors of each position: (nb, C, v) -> weights d[p] * s[p]^2
    Zv = Z.reshape(nb, v, C).permute(0, 2, 1)               # (nb, C, v)
    wcol = d * s * s

    def pts(p0, p1):
        return Zv[:, p0:p1].reshape(-1, v), wcol[p0:p1][None, :].expand(nb, -1).reshape(-1)

    obook = None
    if n_out:
        x, w = pts(0, n_out)
        obook = _f16(weighted_kmeans(x, w, qt.k, opts.kmeans_iters, gen, opts.kmeans_points))
    books = torch.empty(qt.groups, qt.k, v)
    rbooks = torch.empty(qt.groups, qt.kr, v) if qt.kr else None
    for g in range(qt.groups):
        p0 = n_out + g * L["gs"]
        p1 = min(C, p0 + L["gs"])
        x, w = pts(p0, p1)
        books[g] = _f16(weighted_kmeans(x, w, qt.k, opts.kmeans_iters, gen, opts.kmeans_points))
        if qt.kr:
            res = x - books[g][nearest(x, books[g])]
            rbooks[g] = _f16(weighted_kmeans(res, w, qt.kr, opts.kmeans_iters, gen, opts.kmeans_points))
    den = _loss(Wp, Hf) or 1.0
    U = torch.from_numpy(inverse_cholesky(Hp, opts.damp)).float()
    hist = []
    idx, ridx, Q, T = gptq_pass(Wp, U, L, v, books, rbooks, obook, s, b, opts.blocksize, collect=opts.refit)
    err = _loss(Wp - Q, Hf) / den
    hist.append(("gptq", err))
    if progress:
        progress("gptq", err)
    res = VQResult(idx, ridx, books, rbooks, obook, permt, s, b, err)
    if opts.refit:
        r2 = _refit(qt, res, T, wcol, L, R, C)
        Q2 = dequantize(qt, r2, R, C)[:, permt]
        e2 = _loss(Wp - Q2, Hf) / den
        hist.append(("refit", e2))
        if progress:
            progress("refit", e2)
        if e2 < err:
            res = replace(r2, rel_err=e2)
    res.history = hist
    res.seconds = time.perf_counter() - t0
    return res


def _refit(qt, r: VQResult, T: torch.Tensor, wcol: torch.Tensor, L: dict, R: int, C: int) -> VQResult:
    """One weighted k-means step on the final assignments: each main / outlier centroid becomes the weighted
    mean of the normalised error-fed-back vectors assigned to it (minus their residual parts); then each
    residual centroid the mean of what remains. Entries with no vector keep their value."""
    v, nb, n_out = qt.v, L["nb"], L["n_out"]
    Zt = ((T - r.colbias) / r.colscale).reshape(nb, v, C).permute(0, 2, 1)     # (nb, C, v)
    W8 = wcol[None, :].expand(nb, -1)

    def mean_into(book, ix, x, w):
        k = book.shape[0]
        sums = torch.zeros(k, v).index_add_(0, ix, x * w[:, None])
        cnt = torch.zeros(k).index_add_(0, ix, w)
        out = book.clone()
        nz = cnt > 0
        out[nz] = sums[nz] / cnt[nz, None]
        return _f16(out)

    obook = r.obook
    if n_out:
        obook = mean_into(r.obook, r.idx[:, :n_out].reshape(-1), Zt[:, :n_out].reshape(-1, v),
                          W8[:, :n_out].reshape(-1))
    books = r.books.clone()
    rbooks = r.rbooks.clone() if r.rbooks is not None else None
    grp = L["grp"]
    for g in range(qt.groups):
        p0 = n_out + g * L["gs"]
        p1 = min(C, p0 + L["gs"])
        x = Zt[:, p0:p1].reshape(-1, v)
        w = W8[:, p0:p1].reshape(-1)
        ix = r.idx[:, p0:p1].reshape(-1)
        if rbooks is not None:
            rx = r.ridx[:, p0 - n_out:p1 - n_out].reshape(-1)
            books[g] = mean_into(r.books[g], ix, x - r.rbooks[g][rx], w)
            rbooks[g] = mean_into(r.rbooks[g], rx, x - books[g][ix], w)
        else:
            books[g] = mean_into(r.books[g], ix, x, w)
    del grp
    return replace(r, books=books, rbooks=rbooks, obook=obook)


__all__ = ["weighted_kmeans", "nearest", "VQOptions", "VQResult", "quantize_matrix", "gptq_pass", "dequantize",
           "to_fields", "from_fields", "relative_error"]
