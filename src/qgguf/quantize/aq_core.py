"""The mathematics of additive quantization (AQ; Egiazarian et al., "Extreme Compression of Large Language
Models via Additive Quantization", AQLM), for one weight matrix, on the CPU.

A weight ``W`` (R rows x C columns, numpy orientation (out, in)) is cut along its inputs into groups of
``g`` consecutive columns; each group of each row is the sum of ``M`` code vectors, one from each of ``M``
learned codebooks of ``2^B`` entries of length ``g``, times a per-row scale::

    W[r, j*g:(j+1)*g] ~= scales[r] * sum_m codebooks[m][codes[r, j, m]]

(internally ``codes`` is ``(R, C/g, M)``; :func:`to_fields` turns it into the file layout ``[C/g][M][R]``).
The objective is the layer's output error on the calibration inputs ``X``::

    ||X W^T - X What^T||^2 = tr((W - What) H (W - What)^T),   H = X^T X

Rows are independent; within a row the groups are coupled through ``H``. The pieces:

* :func:`kmeans` and :func:`residual_kmeans_init`: codebook ``m`` is fitted by k-means to the residual left
  by codebooks ``< m`` (on the row-normalised weight ``W / scales``, scales = row norms, as AQLM);
* :func:`beam_search`: re-encodes the codes against ``H`` (AQLM's ``beam_search_optimal_codes``): for each
  input group (outer loop) and codebook (inner loop), every row keeps a beam of hypotheses; each hypothesis
  is extended by every replacement of that one code, the loss change computed exactly through ``H`` (the
  H-weighted residual of the other groups enters through ``q = (W - What) H[:, group]``), and the best
  ``beam`` (hypothesis, replacement) pairs per row survive. The best per-row loss never increases, and the
  result is compared exactly with the start row by row, so a call never makes any row worse;
* :func:`adam_refine`: Adam on the codebooks and scales with the codes fixed (AQLM's codebook update);
* :func:`quantize_matrix`: init, then rounds of (Adam, beam search) until the relative error improves by
  less than ``tol`` (or ``max_rounds``), keeping the best iterate.

Everything is seeded (a ``torch.Generator``); the same inputs and seed give the same codes.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..errors import OptionError

# ------------------------------------------------------------------------------------------------
# configurations


_CFG_RX = re.compile(r"^aq-(\d+)x(\d+)-g(\d+)$", re.IGNORECASE)


@dataclass(frozen=True)
class AQConfig:
    """``aq-MxB-gG``: ``M`` codebooks of ``2^B`` entries over groups of ``g`` input columns."""
    M: int
    B: int
    g: int

    @property
    def name(self) -> str:
        return f"aq-{self.M}x{self.B}-g{self.g}"

    @property
    def K(self) -> int:
        return 1 << self.B

    @property
    def code_bits(self) -> float:
        """Bits of codes per weight (the capacity, without codebooks and scales)."""
        return self.M * self.B / self.g

    @property
    def code_dtype(self):
        return np.uint8 if self.B <= 8 else np.uint16

    def fits(self, ncols: int) -> bool:
        return ncols % self.g == 0

    def nbytes(self, rows: int, cols: int) -> int:
        """Every byte of one matrix: codes (``B/8`` bytes each), float16 codebooks, float32 scales."""
        codes = (cols // self.g) * self.M * rows * np.dtype(self.code_dtype).itemsize
        return int(codes + self.M * self.K * self.g * 2 + rows * 4)

    def bpw(self, rows: int, cols: int) -> float:
        return 8.0 * self.nbytes(rows, cols) / (rows * cols)

    def __str__(self) -> str:
        return self.name


def parse_config(name: str) -> AQConfig:
    m = _CFG_RX.match(str(name).strip())
    if not m:
        raise OptionError(f"AQ configuration {name!r}: expected aq-MxB-gG, e.g. aq-2x8-g8")
    M, B, g = (int(v) for v in m.groups())
    if not 1 <= M <= 8 or B not in (8, 16) or g not in (4, 8, 16, 32):
        raise OptionError(f"AQ configuration {name!r}: M in 1..8, B in {{8, 16}}, g in {{4, 8, 16, 32}}")
    return AQConfig(M, B, g)


#: the configurations qgguf offers (``--aq-config``; ``--bits`` chooses among them)
CONFIG_NAMES = ("aq-1x16-g8", "aq-1x16-g16", "aq-1x8-g8", "aq-1x8-g16", "aq-2x8-g8", "aq-2x8-g16",
                "aq-3x8-g8", "aq-3x8-g16", "aq-4x8-g8", "aq-4x8-g16")
CONFIGS = tuple(parse_config(n) for n in CONFIG_NAMES)


# ------------------------------------------------------------------------------------------------
# helpers


def dequantize(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """codes (R, J, M) long, codebooks (M, K, g), scales (R,) -> What (R, J*g). Differentiable in the
    codebooks and scales."""
    R, J, M = codes.shape
    g = codebooks.shape[-1]
    acc = None
    for m in range(M):
        v = codebooks[m][codes[:, :, m]]          # (R, J, g)
        acc = v if acc is None else acc + v
    return acc.reshape(R, J * g) * scales[:, None]


def row_losses(D: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Per-row ``d H d^T`` of the rows of ``D`` (float32 products, float64 sums)."""
    D = D.float()
    return ((D @ H.float()) * D).double().sum(-1)


def relative_error(W: torch.Tensor, What: torch.Tensor, H: torch.Tensor) -> float:
    """``tr((W-What) H (W-What)^T) / tr(W H W^T)``."""
    num = float(row_losses(W - What, H).sum())
    den = float(row_losses(W, H).sum())
    return num / den if den > 0 else 0.0


def prepare_gram(H, damp: float = 0.0) -> torch.Tensor:
    """float32 ``H / mean(diag H)`` (plus ``damp`` on the diagonal); dead inputs get a tiny diagonal so that
    their weights are still pulled towards the original (harmless for the objective)."""
    H = torch.as_tensor(np.asarray(H) if not isinstance(H, torch.Tensor) else H).double()
    d = torch.diagonal(H)
    mean = float(d.mean()) if float(d.mean()) > 0 else 1.0
    H = H / mean
    dead = torch.diagonal(H) <= 0
    add = torch.zeros_like(torch.diagonal(H))
    add[dead] = 1e-6
    if damp:
        add += damp
    H = H + torch.diag(add)
    return H.float().contiguous()


# ------------------------------------------------------------------------------------------------
# k-means initialisation


def kmeans(x: torch.Tensor, k: int, iters: int, gen: torch.Generator, chunk: int = 2048
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means of the rows of ``x`` (N, d) into ``k`` centroids; init: ``k`` distinct random points
    (random duplicates + jitter when N < k); empty clusters take the points farthest from their centroid.
    Returns (centroids (k, d), assignment (N,) long)."""
    N, d = x.shape
    if N >= k:
        c = x[torch.randperm(N, generator=gen)[:k]].clone()
    else:
        idx = torch.cat([torch.arange(N), torch.randint(0, N, (k - N,), generator=gen)])
        c = x[idx].clone()
        scale = float(x.std()) if N > 1 else 1.0
        c[N:] += 1e-3 * scale * torch.randn(k - N, d, generator=gen)
    assign = None
    for _ in range(max(1, iters)):
        new, dist = _nearest(x, c, chunk)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        sums = torch.zeros(k, d).index_add_(0, assign, x)
        cnt = torch.bincount(assign, minlength=k).float()
        nz = cnt > 0
        c[nz] = sums[nz] / cnt[nz, None]
        empty = torch.nonzero(~nz).flatten()
        if len(empty) and N > 0:
            far = torch.argsort(dist, descending=True, stable=True)[: len(empty)]
            c[empty[: len(far)]] = x[far]
    assign, _ = _nearest(x, c, chunk)
    return c, assign


def _nearest(x: torch.Tensor, c: torch.Tensor, chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of every row of ``x`` (cache-sized chunks) and the squared distance to it."""
    cn = (c * c).sum(1)
    out = torch.empty(x.shape[0], dtype=torch.long)
    dist = torch.empty(x.shape[0])
    step = max(1, min(chunk, (1 << 19) // max(1, c.shape[0])))
    cT = c.T.contiguous()
    for s in range(0, x.shape[0], step):
        xs = x[s:s + step]
        v, i = torch.addmm(cn, xs, cT, beta=1, alpha=-2).min(1)
        out[s:s + step] = i
        dist[s:s + step] = v + (xs * xs).sum(1)
    return out, dist


def residual_kmeans_init(W: torch.Tensor, cfg: AQConfig, gen: torch.Generator, iters: int = 25,
                         max_points: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AQLM's initialisation: scales = row norms; codebook ``m`` = k-means of the residual of
    ``W / scales`` after codebooks ``< m`` (fitted on at most ``max_points`` random groups, all groups
    then assigned). Returns (codes (R, J, M) long, codebooks (M, K, g), scales (R,))."""
    R, C = W.shape
    J = C // cfg.g
    scales = W.norm(dim=1) + 1e-9
    res = (W / scales[:, None]).reshape(R * J, cfg.g).clone()
    codes = torch.empty(R, J, cfg.M, dtype=torch.long)
    books = torch.empty(cfg.M, cfg.K, cfg.g)
    for m in range(cfg.M):
        pts = res
        if max_points is not None and res.shape[0] > max_points:
            pts = res[torch.randperm(res.shape[0], generator=gen)[:max_points]]
        c, _ = kmeans(pts, cfg.K, iters, gen)
        a, _ = _nearest(res, c)
        books[m] = c
        codes[:, :, m] = a.reshape(R, J)
        res -= c[a]
    return codes, books, scales


# ------------------------------------------------------------------------------------------------
# beam search over the codes


@torch.no_grad()
def beam_search(W: torch.Tensor, H: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
                codes: torch.Tensor, beam: int = 4, gen: torch.Generator | None = None,
                chunk_floats: int = 1 << 18, old_losses: torch.Tensor | None = None,
                return_losses: bool = False):
    """New codes (R, J, M) that minimise ``tr((W - What) H (W - What)^T)`` given codebooks and scales
    (module docstring). ``gen``: shuffle the order of the groups and codebooks (AQLM's ``dim_rng``);
    None keeps the natural order. Rows are independent and done in chunks whose residuals hold about
    ``chunk_floats`` values (cache-sized). Never worse than ``codes`` for any row (exact float64
    comparison at the end). ``old_losses``: the per-row losses of ``codes`` when known; ``return_losses``:
    also return the per-row losses of the result."""
    R, C = W.shape
    J, M = codes.shape[1], codes.shape[2]
    K = codebooks.shape[1]
    beam = max(1, int(beam))
    W = W.float()
    H = H.float().contiguous()
    cb = codebooks.float().contiguous()
    s = scales.float()
    jorder = list(range(J))
    if gen is not None:
        jorder = torch.randperm(J, generator=gen).tolist()
        morders = [torch.randperm(M, generator=gen).tolist() for _ in range(J)]
    else:
        morders = [list(range(M))] * J
    pre = _book_tables(cb, H, jorder)
    rows_per = max(8, chunk_floats // max(1, beam * max(C, K)))
    out = torch.empty_like(codes)
    for r0 in range(0, R, rows_per):
        r1 = min(R, r0 + rows_per)
        fn = _greedy_rows if beam == 1 else _beam_rows
        out[r0:r1] = fn(W[r0:r1], H, cb, s[r0:r1], codes[r0:r1], beam, jorder, morders, pre)
    # per-row safeguard, recomputed from scratch
    old = old_losses if old_losses is not None else row_losses(W - dequantize(codes, cb, s), H)
    new = row_losses(W - dequantize(out, cb, s), H)
    worse = new > old
    if bool(worse.any()):
        out[worse] = codes[worse]
        new = torch.where(worse, old, new)
    return (out, new) if return_losses else out


def _book_tables(cb, H, jorder):
    """Per group j: (Hjj, per codebook uHu (K,)), shared by all row chunks."""
    M, K, g = cb.shape
    pre = {}
    for j in jorder:
        sl = slice(j * g, (j + 1) * g)
        Hjj = H[sl, sl].contiguous()
        uHu = ((cb @ Hjj) * cb).sum(-1)                      # (M, K)
        pre[j] = (Hjj, uHu)
    return pre


def _greedy_rows(W, H, cb, s, codes, beam, jorder, morders, pre):
    """Beam of one: coordinate descent, each code replaced by its best value given all the others."""
    R, C = W.shape
    M, K, g = cb.shape
    D = W - dequantize(codes, cb, s)                         # (R, C)
    cd = codes.clone()
    s_ = s[:, None]
    s2 = (s * s)[:, None]
    cbT = cb.transpose(1, 2).contiguous()                    # (M, g, K)
    for j, ms in zip(jorder, morders):
        sl = slice(j * g, (j + 1) * g)
        Hjj, uHu = pre[j]
        q = D @ H[:, sl]                                     # (R, g)
        Dj = D[:, sl].clone()
        cj = cd[:, j, :].clone()
        for m in ms:
            o = cb[m][cj[:, m]]                              # (R, g)
            # loss change of replacing o by u:  s^2 uHu - 2 s u.(q + s Hjj o) + const(o)
            t = q + s_ * (o @ Hjj)
            score = s2 * uHu[m][None, :] - 2.0 * s_ * (t @ cbT[m])    # (R, K)
            own = score.gather(1, cj[:, m:m + 1])
            val, nc = score.min(1)
            keep = val >= own[:, 0]
            nc = torch.where(keep, cj[:, m], nc)
            delta = s_ * (cb[m][nc] - o)
            Dj -= delta
            q -= delta @ Hjj
            cj[:, m] = nc
        D[:, sl] = Dj
        cd[:, j, :] = cj
    return cd


def _beam_rows(W, H, cb, s, codes, beam, jorder, morders, pre):
    R, C = W.shape
    M, K, g = cb.shape
    rows = torch.arange(R)
    D = (W - dequantize(codes, cb, s)).unsqueeze(0)          # (b, R, C) residual per hypothesis
    loss = ((D[0] @ H) * D[0]).sum(-1).unsqueeze(0)          # (b, R)
    cd = codes.unsqueeze(0).clone()                          # (b, R, J, M)
    s_ = s[None, :, None]                                    # (1, R, 1)
    s2 = (s * s)[None, :, None]
    cbT = cb.transpose(1, 2).contiguous()
    for j, ms in zip(jorder, morders):
        sl = slice(j * g, (j + 1) * g)
        Hjj, uHu = pre[j]
        q = D @ H[:, sl]                                     # (b, R, g): (W - What) H[:, group]
        Dj = D[:, :, sl].clone()
        cj = cd[:, :, j, :].clone()                          # (b, R, M)
        src = torch.arange(D.shape[0])[:, None].expand(-1, R).clone()   # hypothesis -> beam at group start
        for m in ms:
            b = q.shape[0]
            o = cb[m][cj[:, :, m]]                           # (b, R, g) current code vectors
            oH = o @ Hjj
            t = q + s_ * oH
            const = 2.0 * s_[..., 0] * (o * q).sum(-1) + s2[..., 0] * (oH * o).sum(-1)
            cand = (loss + const)[:, :, None] + s2 * uHu[m] - 2.0 * s_ * (t @ cbT[m])    # (b, R, K)
            # never lose a hypothesis to rounding: its own code scores exactly its loss
            cand.scatter_(2, cj[:, :, m:m + 1], loss[:, :, None])
            nb = min(beam, b * K)
            flat = cand.permute(1, 0, 2).reshape(R, b * K)
            val, idx = torch.topk(flat, nb, dim=1, largest=False, sorted=True)
            sb = (idx // K).T                                # (nb, R) source hypothesis
            nc = (idx % K).T                                 # (nb, R) new code
            gather = sb, rows[None, :].expand(nb, -1)
            q, Dj, cj, src, o = q[gather], Dj[gather], cj[gather], src[gather], o[gather]
            delta = s_ * (cb[m][nc] - o)                     # (nb, R, g) change of What in the group
            Dj -= delta
            q -= delta @ Hjj
            cj[:, :, m] = nc
            loss = val.T.contiguous()
        if not (src.shape[0] == D.shape[0] and bool((src == torch.arange(src.shape[0])[:, None]).all())):
            gather = src, rows[None, :].expand(src.shape[0], -1)
            D = D[gather]
            cd = cd[gather]
        D[:, :, sl] = Dj
        cd[:, :, j, :] = cj
    best = loss.argmin(0)
    return cd[best, rows]


def reencode_l2(target: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor, codes: torch.Tensor,
                max_fraction: float = 1.0, chunk: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
    """PV-Tuning's linearised code step (Malinovskii et al., "PV-Tuning: Beyond Straight-Through Estimation
    for Extreme LLM Compression", the V step with an identity metric): new codes that bring ``What`` closer to
    ``target`` (R, C) in plain squared distance, codebooks and scales fixed. Groups are independent under the
    identity metric; each group's codes are replaced one codebook at a time (in order) by the entry nearest to
    the group's residual plus that codebook's own vector (one pass of greedy coordinate descent, so a group's
    distance never increases). Only the ``max_fraction`` of all groups (R * C/g) whose distance fell the most
    take their new codes (PV-Tuning's bound on the codes changed per step); the others keep theirs. Returns the
    new codes (R, J, M) and a (R, J) bool mask of the groups that changed."""
    R, J, M = codes.shape
    K, g = codebooks.shape[1], codebooks.shape[2]
    cb = codebooks.float()
    cbn = (cb * cb).sum(-1)                                   # (M, K)
    cbT = cb.transpose(1, 2).contiguous()                     # (M, g, K)
    s = scales.float().reshape(R, 1, 1)
    t = (target.float().reshape(R, J, g) / torch.where(s == 0, torch.ones_like(s), s)).reshape(R * J, g)
    s2 = (s * s).expand(R, J, 1).reshape(R * J)
    flat = codes.reshape(R * J, M)
    new = flat.clone()
    gain = torch.zeros(R * J)
    for a in range(0, R * J, chunk):
        b = min(R * J, a + chunk)
        c = new[a:b]
        acc = sum(cb[m][c[:, m]] for m in range(M))           # (n, g) the group's code sum
        res = t[a:b] - acc
        d0 = (res * res).sum(-1)
        for m in range(M):
            own = cb[m][c[:, m]]
            x = res + own                                      # what codebook m should reproduce
            score = torch.addmm(cbn[m], x, cbT[m], beta=1, alpha=-2)       # ||x - u||^2 - ||x||^2
            best, idx = score.min(1)
            cur = score.gather(1, c[:, m:m + 1])[:, 0]
            idx = torch.where(best < cur, idx, c[:, m])
            res = x - cb[m][idx]
            c[:, m] = idx
        gain[a:b] = (d0 - (res * res).sum(-1)) * s2[a:b]
    changed = (new != flat).any(-1) & (gain > 0)
    n_max = int(max_fraction * R * J)
    if int(changed.sum()) > n_max:
        keep = torch.zeros_like(changed)
        if n_max > 0:
            keep[torch.topk(torch.where(changed, gain, torch.full_like(gain, -1.0)), n_max).indices] = True
        changed &= keep
    out = torch.where(changed[:, None], new, flat)
    return out.reshape(R, J, M), changed.reshape(R, J)


# ------------------------------------------------------------------------------------------------
# Adam on codebooks and scales


def adam_refine(W: torch.Tensor, H: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor,
                scales: torch.Tensor, steps: int, lr: float = 1e-3, betas=(0.9, 0.95),
                round_f16: bool = True, start_err: float | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``steps`` Adam steps on the codebooks and scales (codes fixed) minimising the relative error
    ``tr(D H D^T) / tr(W H W^T)``, ``D = W - What``. ``lr`` is relative: the codebooks are optimised in
    units of their RMS and the scales as ``scales * f`` (``f`` from 1). The gradient is written out (one
    ``D @ H`` product per step, where autograd would need two). Keeps the best iterate, checked with
    float16-rounded codebooks when ``round_f16`` (as stored). Returns (codebooks, scales, relative error)."""
    W = W.float()
    H = H.float().contiguous()
    R, C = W.shape
    M, K, g = codebooks.shape
    J = C // g
    den = float(row_losses(W, H).sum()) or 1.0
    cb_rms = float(codebooks.float().pow(2).mean().sqrt()) or 1.0
    x = (codebooks.float() / cb_rms).clone()             # codebooks in units of their rms
    f = torch.ones(R)
    s0 = scales.float()
    flat_idx = [(codes[:, :, m] + m * K).reshape(-1) for m in range(M)]
    b1, b2 = betas
    mx, vx = torch.zeros_like(x), torch.zeros_like(x)
    mf, vf = torch.zeros_like(f), torch.zeros_like(f)
    eps = 1e-8

    def stored(xv, fv):
        c = xv * cb_rms
        if round_f16:
            c = c.half().float()
        return c, s0 * fv

    c0, sc0 = stored(x, f)
    e0 = start_err if start_err is not None else relative_error(W, dequantize(codes, c0, sc0), H)
    best = (e0, c0, sc0)
    for t in range(1, max(0, int(steps)) + 1):
        U = dequantize(codes, x * cb_rms, torch.ones(R))   # (R, C) unscaled sum of code vectors
        D = W - U * (s0 * f)[:, None]
        G = (D @ H) * (-2.0 / den)                           # dloss/dWhat
        gf = (G * U).sum(1) * s0                             # dloss/df
        GU = (G * (s0 * f)[:, None]).reshape(R * J, g)       # dloss/d(code vector) per group
        gx = torch.zeros(M * K, g)
        for m in range(M):
            gx.index_add_(0, flat_idx[m], GU)
        gx = gx.reshape(M, K, g) * cb_rms
        for p, gr, mm, vv in ((x, gx, mx, vx), (f, gf, mf, vf)):
            mm.mul_(b1).add_(gr, alpha=1 - b1)
            vv.mul_(b2).addcmul_(gr, gr, value=1 - b2)
            mhat = mm / (1 - b1 ** t)
            vhat = vv / (1 - b2 ** t)
            p.sub_(lr * mhat / (vhat.sqrt() + eps))
    if steps:
        c1, sc1 = stored(x, f)
        e1 = relative_error(W, dequantize(codes, c1, sc1), H)
        if e1 < best[0]:
            best = (e1, c1, sc1)
    return best[1], best[2], best[0]


# ------------------------------------------------------------------------------------------------
# one matrix


@dataclass
class AQOptions:
    beam: int = 4
    max_rounds: int = 4
    tol: float = 0.01             # stop when a round improves the relative error by less than this fraction
    adam_steps: int = 40          # Adam steps of the first round (half of them for the final update)
    adam_later: int | None = None # Adam steps of the later rounds (None: adam_steps // 4)
    lr: float = 2e-3
    kmeans_iters: int = 25
    kmeans_points: int | None = 1 << 15
    shuffle: bool = True
    damp: float = 0.0


@dataclass
class AQResult:
    codes: torch.Tensor           # (R, J, M) long
    codebooks: torch.Tensor       # (M, K, g) float32 (float16-exact)
    scales: torch.Tensor          # (R,) float32
    rel_err: float
    history: list = field(default_factory=list)   # (stage, relative error)
    seconds: float = 0.0


def quantize_matrix(W, H, cfg: AQConfig, opts: AQOptions | None = None, seed: int = 0,
                    progress: Callable[[str, float], None] | None = None) -> AQResult:
    """AQ of one matrix ``W`` (R, C) against the Gram matrix ``H`` (C, C) (module docstring)."""
    t0 = time.perf_counter()
    opts = opts or AQOptions()
    W = torch.as_tensor(np.asarray(W, np.float32)) if not isinstance(W, torch.Tensor) else W.float()
    if W.shape[1] % cfg.g:
        raise OptionError(f"{cfg.name}: rows of {W.shape[1]} do not divide into groups of {cfg.g}")
    Hf = prepare_gram(H, opts.damp)
    gen = torch.Generator().manual_seed(int(seed) % (2 ** 63))
    codes, books, scales = residual_kmeans_init(W, cfg, gen, opts.kmeans_iters, opts.kmeans_points)
    books = books.half().float()
    hist = []
    den = float(row_losses(W, Hf).sum()) or 1.0
    err = relative_error(W, dequantize(codes, books, scales), Hf)
    hist.append(("init", err))
    if progress:
        progress("init", err)
    best = AQResult(codes, books, scales, err)
    later = opts.adam_later if opts.adam_later is not None else max(1, opts.adam_steps // 4)
    for rnd in range(max(0, opts.max_rounds)):
        books, scales, e_adam = adam_refine(W, Hf, codes, books, scales, opts.adam_steps if rnd == 0 else later,
                                            opts.lr, start_err=err)
        hist.append((f"adam{rnd}", e_adam))
        if progress:
            progress(f"round {rnd + 1} adam", e_adam)
        codes, losses = beam_search(W, Hf, books, scales, codes, opts.beam, gen if opts.shuffle else None,
                                    return_losses=True)
        err = float(losses.sum()) / den
        hist.append((f"beam{rnd}", err))
        if progress:
            progress(f"round {rnd + 1} beam", err)
        prev = best.rel_err
        if err < prev:
            best = AQResult(codes, books, scales, err)
        if prev - err < opts.tol * prev:
            break
    # a last codebook/scale update for the final codes
    books, scales, e_fin = adam_refine(W, Hf, best.codes, best.codebooks, best.scales, max(1, opts.adam_steps // 2),
                                       opts.lr, start_err=best.rel_err)
    hist.append(("final adam", e_fin))
    if e_fin < best.rel_err:
        best = AQResult(best.codes, books, scales, e_fin)
    best.history = hist
    best.seconds = time.perf_counter() - t0
    return best


def to_fields(res_codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor, cfg: AQConfig) -> dict:
    """The file fields: codes ``[C/g][M][R]`` (uint8 / uint16, R fastest), codebooks float16 ``[M][2^B][g]``,
    scales float32 ``[R]``."""
    codes = res_codes.permute(1, 2, 0).contiguous().numpy().astype(cfg.code_dtype)
    return {"codes": np.ascontiguousarray(codes),
            "codebooks": np.ascontiguousarray(codebooks.detach().float().numpy().astype(np.float16)),
            "scales": np.ascontiguousarray(scales.detach().float().numpy().astype(np.float32))}


def from_fields(fields: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    codes = torch.from_numpy(np.asarray(fields["codes"]).astype(np.int64)).permute(2, 0, 1).contiguous()
    books = torch.from_numpy(np.asarray(fields["codebooks"], np.float32))
    scales = torch.from_numpy(np.asarray(fields["scales"], np.float32))
    return codes, books, scales


def fields_dequantize(fields: dict) -> np.ndarray:
    """W (R, C) float32 from the file fields (reference, for tests)."""
    codes, books, scales = from_fields(fields)
    return dequantize(codes, books, scales).numpy()


__all__ = ["AQConfig", "parse_config", "CONFIGS", "CONFIG_NAMES", "dequantize", "relative_error", "prepare_gram",
           "kmeans", "residual_kmeans_init", "beam_search", "reencode_l2", "adam_refine", "AQOptions", "AQResult",
           "quantize_matrix", "to_fields", "from_fields", "fields_dequantize", "row_losses"]
