"""How much each tensor's quantization hurts the model, per candidate type (issue 6).

One calibration pass through the float model, block by block (the staged forward of
:mod:`qgguf.quantize.blockwise`), gives for every block linear ``t`` the Gram matrix ``H = X^T X`` of its
inputs over ``N`` calibration tokens. For every candidate type ``q`` the tensor is quantized the way the
conversion quantizes it (the type's importance-weighted search with the importance matrix: ``--imatrix FILE``
or ``diag(H) / N``) and its *layer output error* is measured::

    e(t, q) = tr(dW H dW^T) / N        dW = dequantize(quantize(W, q)) - W

(the mean squared error the quantized layer adds to its outputs, per token: activation- and weight-error at
once). For the tied or untied embedding/output matrix ``H`` is the Gram matrix of the final normed hidden
states (its role as the output head).

The layer error is not yet the damage to the model: the same error hurts more in some layers than in others.
Each tensor therefore gets a factor from *real* measurements: the tensor alone is quantized to a reference type
(the candidate closest to 4.5 bits per weight), the float model's later blocks run on a few calibration
sequences from that layer on (the layer inputs are cached), and the KL divergence of the final distribution
to the float model's is taken (on the second half of each sequence, as llama-perplexity scores). ``alpha_t = KLD_t(ref) / e(t, ref)`` is the tensor's propagation factor, and
the predicted KL divergence of any candidate is ``alpha_t * e(t, q)`` (KL divergence is quadratic in small
perturbations, like ``e``). To keep the cost within the conversion's, the block linears are measured in every
``n_layer // 6``-th layer (and the last; ``alpha_stride``) and the factors of the layers between are
interpolated per role (attn_q, ..., ffn_down) in the layer index; the embedding/output matrix is always
measured. The allocator (:mod:`qgguf.convert.budget`) adds these single-tensor
predictions.

qgguf's own AQ types (``aq-MxB-gG``, :data:`AQ_CANDIDATES`; offered by ``--compat any`` with ``--method aq``)
are measured the same way: the tensor is quantized by the layer-wise AQ algorithm of the conversion
(:func:`qgguf.quantize.aq_core.quantize_matrix`: residual k-means, beam search, Adam on codebooks and scales)
against the same ``H``, with fewer rounds (:data:`AQ_MEASURE`; no block fine-tuning), and ``e(t, q)`` times the
tensor's ``alpha_t`` is its prediction. Their sizes count every byte the writer stores (companions padded, their
tensor-info records and ``qgguf.tensor.*`` keys: :func:`qgguf.convert.budget.file_bytes`). The reference type of
``alpha_t`` is always a standard type.

The AQ search costs far more than the standard types' (about 25 s per SmolLM2 block on one core against 3 s), so by
default (``aq_search="sampled"``) it runs only in the layers of the KL divergence measurements (every
``n_layer // 6``-th and the last); in the other layers each AQ candidate's error is predicted per role from a
standard candidate measured everywhere: ``e(t, aq) = e(t, s) * r(l)``, where ``s`` is the standard type nearest in
bits per weight whose error is positive on every tensor of the role, and ``log r`` (``r = e(aq) / e(s)`` in the
searched layers) is interpolated linearly in the layer index (:func:`predict_aq_errors`). ``aq_search="full"``
searches every layer. With ``check`` a few unsearched layers are also searched (held out: the prediction stays in
use) and the rank correlation of predicted and searched AQ errors is reported (``proxy_check["aq_prediction"]``).

``check``: that many more single-tensor measurements with other types, whose Spearman rank correlation with
the prediction (and with the bare layer error) is reported: the proxy checked against real KL divergence.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .. import gguf_types
from ..convert.budget import Option, TensorOptions, file_bytes
from ..gguf_types.codebook import is_codebook
from ..gguf_types.tiers import is_tiered
from ..runtime import model as rm
from ..runtime.threads import torch_threads

#: llama.cpp-loadable candidates, most bytes first (BF16: same size as F16 and less precise, left out)
STANDARD_CANDIDATES = ("F16", "Q8_0", "Q6_K", "Q5_1", "Q5_K", "Q5_0", "Q4_1", "Q4_K", "IQ4_NL", "Q4_0", "Q3_K", "Q2_K")
#: qgguf's AQ candidates of block linears (``--compat any``, ``--method aq``; ``--mix-types`` may name any other
#: AQ configuration): one codebook apart, about 1.1, 2.1, 3.2 and 4.2 bits per weight on SmolLM2's rows of 576,
#: every byte counted. Left out: aq-3x8-g16 (``--bits 2``'s choice, 1.8 bpw), which on a SmolLM2 ffn_up lies above
#: the line between aq-1x8-g8 and aq-2x8-g8 (relative error 0.160 against 0.266 and 0.088), so the allocator's
#: convex-hull greedy would not take it, and the 16-entry-codebook configurations (their codebooks alone are
#: 128 KiB per tensor)
AQ_CANDIDATES = ("aq-4x8-g8", "aq-3x8-g8", "aq-2x8-g8", "aq-1x8-g8")
#: the AQ search of the measurement: the conversion's algorithm with two rounds, fewer Adam steps and a smaller k-means
#: (the conversion: quantize/aq.py METHOD_DEFAULTS, up to 4 rounds, then block fine-tuning), with the conversion's
#: damping of H (damp=1; undamped, the search on SmolLM2's blk.11.ffn_down, whose inputs have a few huge
#: activations, measured aq-2x8-g8 worse than aq-1x8-g8 and 10^4 times Q4_K's layer error)
AQ_MEASURE = dict(beam=1, max_rounds=2, tol=0.01, adam_steps=10, adam_later=5, lr=5e-3, kmeans_iters=8,
                  kmeans_points=8192, damp=1.0)
REF_BPW = 4.5
AQ_SEARCH = ("sampled", "full")
AQ_CHECK_LAYERS = 3      # with ``check``: unsearched layers also searched to check the sampled AQ prediction
MAX_ERROR_ROWS = 4096    # tensors with more rows (embeddings) measure e on every k-th row


def candidate_types(shape, types=STANDARD_CANDIDATES) -> list[str]:
    """The candidates whose block divides the row length."""
    n = int(shape[-1])
    return [t for t in types if gguf_types.get(t).fits(n)]


@dataclass
class TensorSensitivity:
    name: str
    shape: tuple[int, ...]
    nbytes: dict[str, int]                 # type -> bytes in the file (budget.file_bytes)
    error: dict[str, float]                # type -> layer output error e(t, q)
    ref: str = ""                          # the type of the real KLD measurement
    ref_kld: float = 0.0
    alpha: float = 0.0                     # KLD per unit of e
    predicted: dict[str, str] = field(default_factory=dict)   # AQ type -> the standard type its e is predicted from
    ref_error: float = 0.0                 # e(t, ref); ref need not be a candidate (an AQ-only --mix-types)
    # the head's row-tiered candidates (probability-weighted errors, _weighted_head): their own factor, measured on
    # ``tier_ref``. The weighted error predicts their gain over a uniform type too well by itself: on SmolLM2,
    # 1,024 Q8_0 rows cut it to 0.24x IQ4_NL's, the real KL divergence to 0.38x (held-out C4), so one factor for
    # both would buy too many upper-tier rows
    tier_ref: str = ""
    tier_alpha: float = 0.0

    def kld(self, q: str) -> float:
        a = self.tier_alpha if self.tier_alpha and q.lower().startswith("tiers-") else self.alpha
        return float(a * self.error[q])

    def options(self, allowed=None) -> TensorOptions:
        return TensorOptions(self.name, [Option(q, self.nbytes[q], self.kld(q)) for q in self.error
                                         if allowed is None or q in allowed])

    def to_json(self) -> dict:
        d = {"alpha": self.alpha, "ref": self.ref, "ref_kld": self.ref_kld, "ref_error": self.ref_error,
             "candidates": {q: [self.nbytes[q], self.error[q], self.kld(q)] for q in self.error}}
        if self.predicted:
            d["aq_predicted_from"] = dict(self.predicted)
        if self.tier_alpha:
            d["tier_ref"], d["tier_alpha"] = self.tier_ref, self.tier_alpha
        return d


@dataclass
class Sensitivity:
    tensors: dict[str, TensorSensitivity]
    dataset: str = ""
    tokens: int = 0
    kld_tokens: int = 0
    seconds: float = 0.0
    proxy_check: dict = field(default_factory=dict)
    aq_seconds: float = 0.0          # of ``seconds``: the AQ search of codebook candidates
    aq_search: str = ""              # "sampled" or "full" (measure's aq_search)


def _is_standard_quant(q: str) -> bool:
    qt = gguf_types.get(q)
    return not qt.is_float and not is_codebook(qt)


def reference_type(shape, types) -> str:
    """The type of a tensor's real KL divergence measurement: of the standard quantized ``types``, the one nearest
    :data:`REF_BPW` bits per weight (the larger at a tie); "" if there is none."""
    if not types:
        return ""
    n = float(np.prod(shape))
    nb = {q: file_bytes("", shape, gguf_types.get(q)) for q in types}
    return min(types, key=lambda q: (abs(8.0 * nb[q] / n - REF_BPW), -nb[q]))


def _err(w: torch.Tensor, wq: torch.Tensor, H: torch.Tensor, N: float) -> float:
    d = (wq - w).to(torch.float32)
    return float(((d @ H) * d).sum()) / N


class _Measurer:
    """Float weights, cached layer inputs of the KLD sequences and the float model's log-probabilities."""

    def __init__(self, source, seqs, progress: bool, threads: int | None):
        md = {k: v.value for k, v in source.metadata.items()}
        md["general.architecture"] = source.arch
        self.source = source
        self.names = {t.name for t in source.tensors}
        emb = torch.from_numpy(np.array(source.load("token_embd.weight"), dtype=np.float32))
        self.hp = hp = rm.hparams_from_metadata(md, emb.shape[0], source.path)
        self.emb = emb
        self.tied = "output.weight" not in self.names
        self.out_w = emb if self.tied else torch.from_numpy(np.array(source.load("output.weight"), np.float32))
        self.out_norm = torch.from_numpy(np.array(source.load("output_norm.weight"), np.float32).reshape(-1))
        self.ids = torch.tensor(seqs, dtype=torch.long)
        T = int(self.ids.shape[1])
        rf = (torch.from_numpy(np.asarray(source.load("rope_freqs.weight"), np.float32).reshape(-1))
              if "rope_freqs.weight" in self.names else None)
        self.rope = rm.rope_tables(hp, T, rf)
        self.shapes = {t.name: tuple(t.shape) for t in source.tensors}
        self.layers: list[dict[str, torch.Tensor]] = []
        self.layer_names: list[dict[str, str]] = []
        self.progress = progress

    def block(self, il: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        from .blockwise import short_key
        keys = {short_key(n, il): n for n in self.names if short_key(n, il) is not None}
        w = {k: torch.from_numpy(np.array(self.source.load(n), dtype=np.float32).reshape(self.shapes[n]))
             for k, n in keys.items()}
        return w, keys

    def head_logp(self, x: torch.Tensor, out_w: torch.Tensor | None = None) -> torch.Tensor:
        h = rm.final_norm(self.hp, self.out_norm, x)
        return F.log_softmax(rm.lm_head(self.out_w if out_w is None else out_w, h), dim=-1)

    def tail_kld(self, il: int, x: torch.Tensor, w_override: dict[str, torch.Tensor] | None,
                 out_w: torch.Tensor | None = None) -> float:
        """KL divergence of the model run from block ``il`` on ``x`` (with block ``il``'s weights overridden)."""
        for j in range(il, self.hp.n_layer):
            w = self.layers[j]
            if j == il and w_override:
                w = dict(w)
                w.update(w_override)
            x = rm.block_forward(self.hp, w, x, self.rope)
        lp = self.head_logp(x[:, self.scored], out_w)
        kld = (self.base_p * (self.base_lp - lp)).sum(-1)
        return float(kld.mean())


def _quantized(qt, w: np.ndarray, imp: np.ndarray | None, row_probs: np.ndarray | None = None) -> torch.Tensor:
    if is_tiered(qt):   # row-tiered (the head): ranked as the conversion ranks it
        data = qt.quantize(w, imp, row_weights=row_probs)
    else:
        data = qt.quantize(w, None if qt.is_float else imp)
    return torch.from_numpy(np.array(qt.dequantize(data, w.shape), dtype=np.float32))


#: row-tiered candidates of the token embedding / output matrix (``--compat any`` with AQ): the likeliest rows in
#: the first type, ``TIER_COUNTS`` of them, the rest in a smaller standard candidate; and three tiers with Q5_0
#: between Q8_0 and the rest
TIER_TOPS = ("Q8_0", "Q5_0")
TIER_COUNTS = (256, 512, 1024, 2048, 4096, 8192)
TIER_MID = (("Q8_0", (256, 512, 1024, 2048)), ("Q5_0", (4096, 8192, 16384)))
#: the row-tiered candidate whose real KL divergence gives the tiers' factor: this many rows in Q8_0, the rest in the
#: head's reference type
TIER_REF_ROWS = 1024
#: the head's weighted layer error takes every row of this many likeliest tokens, and every k-th of the others
HEAD_EXACT_ROWS = 16384


def tier_candidates(shape, pool) -> list[str]:
    """Row-tiered types over the standard candidates ``pool`` that fit ``shape``'s rows (too few rows: none)."""
    R = int(np.prod(shape[:-1]))
    std = [q for q in candidate_types(shape, pool) if _is_standard_quant(q)]
    bpw = {q: gguf_types.get(q).bpw for q in std}
    out = []
    for top in TIER_TOPS:
        if top not in bpw:
            continue
        for base in (q for q in std if bpw[q] < bpw[top]):
            out += [f"tiers-{top}@{n}-{base}" for n in TIER_COUNTS if n < R]
    (t1, n1s), (t2, n2s) = TIER_MID
    if t1 in bpw and t2 in bpw:
        for base in (q for q in std if bpw[q] < bpw[t2]):
            out += [f"tiers-{t1}@{a}-{t2}@{b}-{base}" for a in n1s for b in n2s if a + b < R]
    return out


@torch.no_grad()
def _weighted_head(ts: TensorSensitivity, types, w: torch.Tensor, probs: np.ndarray, imp: np.ndarray,
                   H: torch.Tensor, n_tok: float) -> None:
    """Layer errors of the head weighted per row by its token's mean probability (times the number of rows:
    weights of mean 1): ``sum_v R p_v (w_v - wq_v)^T H (w_v - wq_v) / N``. To second order the KL divergence of
    logit errors ``e`` is ``1/2 sum_v p_v (e_v - mean_p e)^2``: a row counts as often as its token is likely
    (the unweighted error counts every row of a 49,152-token vocabulary alike, and cannot see row tiers). Every
    row of the :data:`HEAD_EXACT_ROWS` likeliest tokens is measured, of the others every k-th, scaled by k; a
    row-tiered type's error is its rows' errors in their tier's type, by rank."""
    R = w.shape[0]
    order = np.argsort(-np.asarray(probs, np.float64), kind="stable")
    top = order[:HEAD_EXACT_ROWS]
    rest = order[HEAD_EXACT_ROWS:]
    k = max(1, -(-rest.size // MAX_ERROR_ROWS))
    rows = np.concatenate([top, rest[::k]])
    rank = np.concatenate([np.arange(top.size), top.size + np.arange(0, rest.size, k)])
    c = np.where(rank < top.size, 1.0, float(k)) * np.asarray(probs, np.float64)[rows] * R
    ws = np.ascontiguousarray(w[torch.from_numpy(rows)].numpy(), dtype=np.float32)
    wt = torch.from_numpy(ws)
    per_row: dict[str, np.ndarray] = {}

    def row_errors(q: str) -> np.ndarray:
        if q not in per_row:
            d = (_quantized(gguf_types.get(q), ws, imp) - wt).to(torch.float32)
            per_row[q] = ((d @ H) * d).sum(1).double().numpy() / n_tok
        return per_row[q]

    for q in types:
        qt = gguf_types.get(q)
        if is_codebook(qt) and not is_tiered(qt):
            continue                       # (AQ: not offered for the head by the allocator)
        ts.nbytes[q] = file_bytes(ts.name, ts.shape, qt)
        if is_tiered(qt):
            bounds = np.cumsum(qt.tier_rows(R))
            tier = np.searchsorted(bounds, rank, side="right")
            e = np.zeros(rows.size)
            for i, (t, _) in enumerate(qt.tiers):
                sel = tier == i
                e[sel] = row_errors(t.name)[sel]
        else:
            e = row_errors(q)
        ts.error[q] = float((c * e).sum())


def _aq_quantized(qt, w: np.ndarray, H: torch.Tensor, name: str, seed: int, options: dict | None = None,
                  outliers: float = 0.0) -> torch.Tensor:
    """``w`` through the layer-wise AQ search (:data:`AQ_MEASURE`, or ``options``) against ``H``, dequantized as
    stored (float16 codebooks); with ``outliers`` the conversion's sparse part as well (that share of the most
    salient weights left out of the search and added back as the float16 corrections the file stores:
    :func:`qgguf.quantize.aq.fit_matrix`, :func:`qgguf.quantize.aq.outlier_values`)."""
    import zlib

    from .aq import fit_matrix, outlier_values
    from .aq_core import AQOptions, dequantize, parse_config
    cfg = parse_config(qt.name)
    opts = AQOptions(**{**AQ_MEASURE, **(options or {})})
    seed = (zlib.crc32(name.encode()) * 7919 + int(seed)) % (2 ** 63)
    w = np.ascontiguousarray(w, dtype=np.float32)
    with torch_threads(1):   # small operations: one thread is faster on a busy machine (aq.py's linear_threads)
        res, idx = fit_matrix(w, H, cfg, opts, outliers, seed=seed)
    deq = dequantize(res.codes, res.codebooks.half().float(), res.scales).to(torch.float32)
    if idx is not None:
        pos = torch.from_numpy(idx)
        _, vals = outlier_values((pos, torch.from_numpy(w.reshape(-1)[idx])), deq)
        deq.view(-1).index_add_(0, pos, torch.from_numpy(vals.astype(np.float32)))
    return deq


def _spearman(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 3:
        return float("nan")
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


@torch.no_grad()
def measure(source, *, types_for: Callable[[str, tuple], list[str]], calib=None, nsamples: int = 32,
            seqlen: int = 512, seed: int = 0, imatrix: dict[str, np.ndarray] | None = None,
            kld_samples: int = 4, kld_seqlen: int = 128, check: int = 0, progress: bool = True,
            threads: int | None = None, log=None, alpha_stride: int | None = None,
            aq_options: dict | None = None, aq_search: str = "sampled", aq_outliers: float = 0.0) -> Sensitivity:
    """Sensitivities of every quantizable tensor (``types_for(name, shape)`` -> its candidate types; a tensor
    with no candidates is skipped). ``imatrix``: importance vectors by tensor name (else ``diag(H)/N``).
    ``alpha_stride``: measure the propagation factors of the block linears in every k-th layer (and the last;
    default ``n_layer // 6``), interpolate the others. ``aq_options``: the AQ search of codebook candidates
    (default :data:`AQ_MEASURE`); ``aq_search``: ``"sampled"`` (search the AQ candidates in the layers of the
    KL divergence measurements only, predict the others: module docstring) or ``"full"`` (every layer).
    ``aq_outliers``: the share of each AQ tensor's weights the conversion keeps as sparse float16 outliers (the AQ
    method's ``outliers``); the AQ candidates' errors and bytes include them."""
    from ..errors import OptionError
    from .blockwise import _calibration, chunk_samples, token_probabilities

    if aq_search not in AQ_SEARCH:
        raise OptionError(f"AQ search {aq_search!r}: expected one of {', '.join(AQ_SEARCH)}")

    t0 = time.perf_counter()
    say = log or (lambda s: None)
    md = {k: v.value for k, v in source.metadata.items()}
    md["general.architecture"] = source.arch
    names = {t.name for t in source.tensors}
    seqs, dataset = _calibration(source, md, names, calib, nsamples, seqlen, seed, progress, threads)
    M = _Measurer(source, seqs, progress, threads)
    hp = M.hp
    ks, kt = min(kld_samples, len(seqs)), min(kld_seqlen, int(M.ids.shape[1]))
    x = rm.embed(M.emb, M.ids)
    xs = x[:ks, :kt].clone()
    N = float(x.shape[0] * x.shape[1])
    chunk = chunk_samples(x.shape[1])
    eps = hp.norm_eps
    sens: dict[str, TensorSensitivity] = {}
    layer_inputs: list[torch.Tensor] = []
    keys_of: dict[str, tuple[int, str]] = {}
    imp_used: dict[str, np.ndarray] = {}     # the importance each tensor was quantized with
    grams: dict[str, torch.Tensor] = {}      # float32 H of the tensors with AQ candidates (proxy check only)
    aq_seconds = [0.0]
    stride = alpha_stride or max(1, hp.n_layer // 6)
    measured_layers = sorted(set(range(0, hp.n_layer, stride)) | {hp.n_layer - 1})
    aq_layers = set(range(hp.n_layer)) if aq_search == "full" else set(measured_layers)
    check_layers = _check_layers(measured_layers, AQ_CHECK_LAYERS) if check and aq_search == "sampled" else []
    held_out: dict[str, dict[str, float]] = {}   # searched AQ errors of the check layers (not used by the plan)
    extra_ref: dict[str, tuple[str, float]] = {}  # tensors without a standard candidate: (reference type, its e)
    row_probs = None                             # mean token probabilities (a head with row-tiered candidates)

    def candidates(name: str, w: torch.Tensor, H: torch.Tensor, n_tok: float, Hf: torch.Tensor | None = None,
                   il: int | None = None) -> None:
        shape = M.shapes[name]
        types = types_for(name, shape)
        if not types:
            return
        w2 = w.reshape(-1, shape[-1])
        imp = imatrix.get(name) if imatrix else None
        if imp is None or np.asarray(imp).shape[-1] != shape[-1]:
            imp = (torch.diagonal(H) / n_tok).to(torch.float32).numpy()
        imp = np.ascontiguousarray(imp, dtype=np.float32)
        imp_used[name] = imp
        Hf = H.to(torch.float32) if Hf is None else Hf
        ts = TensorSensitivity(name, shape, {}, {})
        if row_probs is not None and il is None:   # the head with row-tiered candidates: probability-weighted
            _weighted_head(ts, types, w2, row_probs, imp, Hf, n_tok)
            sens[name] = ts
            return
        step = max(1, -(-w2.shape[0] // MAX_ERROR_ROWS))
        ws = np.ascontiguousarray(w2[::step].numpy(), dtype=np.float32)
        wt = torch.from_numpy(ws)
        for q in types:
            qt = gguf_types.get(q)
            ts.nbytes[q] = file_bytes(name, shape, qt, aq_outliers if is_codebook(qt) else 0.0)
            if is_codebook(qt):
                if check:
                    grams[name] = Hf
                if il is not None and il not in aq_layers and il not in check_layers:
                    continue   # predicted after the pass (predict_aq_errors)
                t_aq = time.perf_counter()
                wq = _aq_quantized(qt, ws, Hf, name, seed, aq_options, aq_outliers)
                aq_seconds[0] += time.perf_counter() - t_aq
                if il is not None and il not in aq_layers:
                    held_out.setdefault(name, {})[q] = _err(wt, wq, Hf, n_tok) * step
                    continue
            else:
                wq = _quantized(qt, ws, imp)
            ts.error[q] = _err(wt, wq, Hf, n_tok) * step
        if not any(_is_standard_quant(q) for q in types):
            # no standard candidate (e.g. --mix-types with AQ configurations only): the propagation factor still
            # needs a standard reference type, measured here (its layer error; not offered to the allocator)
            ref = reference_type(shape, [q for q in candidate_types(shape) if _is_standard_quant(q)])
            if ref:
                extra_ref[name] = (ref, _err(wt, _quantized(gguf_types.get(ref), ws, imp), Hf, n_tok) * step)
        sens[name] = ts

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=hp.n_layer, desc="sensitivity", unit="blk", leave=False)
    for il in range(hp.n_layer):
        w, keys = M.block(il)
        M.layers.append(w)
        layer_inputs.append(xs)
        Hs = {}
        for sl in (slice(s, min(s + chunk, x.shape[0])) for s in range(0, x.shape[0], chunk)):
            xc = x[sl]
            n = rm.rms_norm(xc, w["attn_norm"], eps)
            a = rm.attention(hp, w, n, M.rope)
            x1 = xc + rm.linear(w, "attn_output", a)
            m = rm.rms_norm(x1, w["ffn_norm"], eps)
            h = rm.ffn_hidden(w, m)
            for g, t in (("qkv", n), ("o", a), ("gu", m), ("d", h)):
                t2 = t.reshape(-1, t.shape[-1])
                g2 = (t2.T @ t2).double()
                Hs[g] = Hs[g] + g2 if g in Hs else g2
            x[sl] = x1 + rm.linear(w, "ffn_down", h)
        group = {"attn_q": "qkv", "attn_k": "qkv", "attn_v": "qkv", "attn_output": "o", "ffn_gate": "gu",
                 "ffn_up": "gu", "ffn_down": "d"}
        Hf = {g: h.to(torch.float32) for g, h in Hs.items()}   # one float32 copy per group (shared by q, k, v)
        for k in rm.BLOCK_LINEARS:
            if k in keys:
                keys_of[keys[k]] = (il, k)
                candidates(keys[k], w[k], Hs[group[k]], N, Hf[group[k]], il)
        del Hs, Hf
        xs = rm.block_forward(hp, w, xs, M.rope)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    # the output head: Gram matrix of the final normed hidden states
    hN = rm.final_norm(hp, M.out_norm, x).reshape(-1, hp.n_embd)
    H_out = (hN.T @ hN).double()
    head_names = ["token_embd.weight"] if M.tied else ["output.weight", "token_embd.weight"]
    if any(is_tiered(gguf_types.get(q)) for n in head_names for q in types_for(n, M.shapes[n])):
        row_probs = token_probabilities(hN, M.out_w)   # the rows' weights (_weighted_head) and tier order
    del x, hN
    M.scored = slice(kt // 2, None)   # KL divergence on the second half of each sequence (as llama-perplexity)
    M.base_lp = M.head_logp(xs[:, M.scored])
    M.base_p = M.base_lp.exp()
    head_name = "token_embd.weight" if M.tied else "output.weight"
    candidates(head_name, M.out_w, H_out, N)
    if not M.tied:
        candidates("token_embd.weight", M.emb, H_out, N)   # an untied embedding: proxy by the head's inputs
    ids_s = M.ids[:ks, :kt]
    aq_check = {}
    if aq_search == "sampled":
        searched = {n for n, (il, _) in keys_of.items() if il in aq_layers}
        pending = {n: [q for q in nbytes_order(sens[n]) if is_codebook(gguf_types.get(q)) and q not in sens[n].error]
                   for n in sens if n in keys_of and n not in searched}
        pending = {n: qs for n, qs in pending.items() if qs}
        if pending:
            predict_aq_errors(sens, keys_of, pending)
            refs = sorted({f"{q}<-{r}" for n in pending for q, r in sens[n].predicted.items()})
            say(f"sensitivity: AQ candidates searched in layers {sorted(aq_layers)}, predicted in the other "
                f"{len({keys_of[n][0] for n in pending})} layers per role from standard types")
            if held_out:
                aq_check = _aq_prediction_check(sens, held_out, keys_of)
                aq_check["refs"] = refs
                say(f"sensitivity: AQ prediction check in unsearched layers {check_layers}: Spearman(predicted, "
                    f"searched AQ error) {aq_check['spearman']:.3f} over {aq_check['pairs']} pairs, same type order "
                    f"in {aq_check['tensors_same_order']}/{aq_check['tensors']} tensors, median searched/predicted "
                    f"{aq_check['ratio_median']:.2f}")
    say(f"sensitivity: layer errors of {len(sens)} tensors x {np.mean([len(s.error) for s in sens.values()]):.1f} "
        f"types in {time.perf_counter() - t0:.1f} s" + (f" ({aq_seconds[0]:.1f} s of it in the AQ search)"
                                                          if aq_seconds[0] else ""))

    def real_kld(name: str, q: str) -> float:
        """KL divergence with only ``name`` quantized to ``q`` (as for e: the same importance)."""
        qt = gguf_types.get(q)
        shape = M.shapes[name]
        imp = imp_used[name]
        if name in keys_of:
            il, k = keys_of[name]
            w = M.layers[il][k]
            w2 = np.ascontiguousarray(w.reshape(-1, shape[-1]).numpy())
            wq = (_aq_quantized(qt, w2, grams[name], name, seed, aq_options, aq_outliers) if is_codebook(qt)
                  else _quantized(qt, w2, imp)).reshape(w.shape)
            return M.tail_kld(il, layer_inputs[il], {k: wq})
        if name == "token_embd.weight":
            wq = _quantized(qt, M.emb.numpy(), imp, row_probs).reshape(M.emb.shape)
            return M.tail_kld(0, rm.embed(wq, ids_s), None, wq if M.tied else None)
        wq = _quantized(qt, M.out_w.numpy(), imp, row_probs).reshape(M.out_w.shape)   # output.weight
        return float((M.base_p * (M.base_lp - M.head_logp(xs[:, M.scored], wq))).sum(-1).mean())

    t1 = time.perf_counter()
    it = [ts for ts in sens.values() if ts.name not in keys_of or keys_of[ts.name][0] in measured_layers]
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="single-tensor KLD", unit="t", leave=False)
    for ts in it:
        ref = reference_type(ts.shape, [q for q in ts.error if _is_standard_quant(q)])
        ts.ref, ts.ref_error = (ref, ts.error[ref]) if ref else extra_ref.get(ts.name, ("", 0.0))
        if not ts.ref:
            continue
        ts.ref_kld = max(0.0, real_kld(ts.name, ts.ref))
        e = ts.ref_error
        ts.alpha = ts.ref_kld / e if e > 0 else 0.0
        tiered = [q for q in ts.error if is_tiered(gguf_types.get(q))]
        if tiered and ts.alpha > 0:   # the head's row tiers: a factor of their own (see TensorSensitivity)
            want = f"tiers-Q8_0@{TIER_REF_ROWS}-{ts.ref}"
            tref = want if want in ts.error else min(tiered, key=lambda q: ts.nbytes[q])
            k, e = max(0.0, real_kld(ts.name, tref)), ts.error[tref]
            ts.tier_ref, ts.tier_alpha = tref, (k / e if e > 0 else ts.alpha)
    _interpolate_alpha(sens, keys_of, measured_layers)
    say(f"sensitivity: {len(it)} single-tensor KLD measurements (layers {measured_layers}, the others' factors "
        f"interpolated per role) on {ks} x {kt} tokens in {time.perf_counter() - t1:.1f} s")
    result = Sensitivity(sens, dataset, int(N), ks * kt)
    result.aq_seconds = aq_seconds[0]
    result.aq_search = aq_search
    if check:
        result.proxy_check = _check(sens, real_kld, check, seed)
        pc = result.proxy_check
        if aq_check:
            pc["aq_prediction"] = aq_check
        say(f"sensitivity: proxy check on {pc['pairs']} (tensor, type) pairs: Spearman(predicted, real KLD) "
            f"{pc['spearman']:.3f}, Spearman(layer error, real KLD) {pc['spearman_layer_error']:.3f}")
    result.seconds = time.perf_counter() - t0
    return result


def _interpolate_alpha(sens: dict[str, TensorSensitivity], keys_of: dict, measured: list[int]) -> None:
    """Propagation factors of the block linears in unmeasured layers: linear in the layer index between the
    measured layers' factors of the same role (``ref_kld`` stays 0, ``ref`` empty: not measured)."""
    by_role: dict[str, list[tuple[int, float]]] = {}
    for name, (il, k) in keys_of.items():
        ts = sens.get(name)
        if ts is not None and il in measured and ts.ref:
            by_role.setdefault(k, []).append((il, ts.alpha))
    for name, (il, k) in keys_of.items():
        ts = sens.get(name)
        if ts is None or il in measured or not by_role.get(k):
            continue
        pts = sorted(by_role[k])
        ts.alpha = float(np.interp(il, [p[0] for p in pts], [p[1] for p in pts]))


def nbytes_order(ts: TensorSensitivity) -> list[str]:
    """The tensor's candidate types, most bytes first."""
    return sorted(ts.nbytes, key=lambda q: -ts.nbytes[q])


def _bpw(ts: TensorSensitivity, q: str) -> float:
    return 8.0 * ts.nbytes[q] / float(np.prod(ts.shape))


def predict_aq_errors(sens: dict[str, TensorSensitivity], keys_of: dict[str, tuple[int, str]],
                      pending: dict[str, list[str]]) -> None:
    """Fill in the layer errors of the AQ types ``pending[name]`` (not searched) from the tensors of the same role
    whose AQ errors were searched: ``e(t, q) = e(t, s) * exp(interp(layer, log(e(u, q) / e(u, s))))`` over the
    searched tensors ``u`` of the role, ``s`` the standard candidate nearest to ``q`` in bits per weight whose error
    is positive on every tensor of the role (without one: ``log e(u, q)`` itself is interpolated). A type no
    tensor of the role was searched with is dropped from the pending tensors' candidates."""
    by_role: dict[str, list[str]] = {}
    for name in sens:
        if name in keys_of:
            by_role.setdefault(keys_of[name][1], []).append(name)
    for role, names in by_role.items():
        todo = [n for n in names if pending.get(n)]
        if not todo:
            continue
        for q in sorted({q for n in todo for q in pending[n]}):
            known = sorted((keys_of[n][0], n) for n in names if q in sens[n].error and n not in pending)
            known = [(il, n) for il, n in known if q not in pending.get(n, ())]
            need = [n for n in todo if q in pending[n]]
            if not known:
                for n in need:
                    sens[n].nbytes.pop(q, None)
                continue
            every = [sens[n] for n in names]
            std = [s for s in sens[known[0][1]].error
                   if not is_codebook(gguf_types.get(s)) and not gguf_types.get(s).is_float
                   and all(s in ts.error and ts.error[s] > 0 for ts in every)]
            ref = min(std, key=lambda s: (abs(_bpw(sens[known[0][1]], s) - _bpw(sens[known[0][1]], q)),
                                          -sens[known[0][1]].nbytes[s])) if std else None
            xs = [il for il, _ in known]
            if ref is not None:
                ys = [np.log(max(sens[n].error[q], 1e-30) / sens[n].error[ref]) for _, n in known]
            else:
                ys = [np.log(max(sens[n].error[q], 1e-30)) for _, n in known]
            for n in need:
                v = float(np.exp(np.interp(keys_of[n][0], xs, ys)))
                sens[n].error[q] = v * sens[n].error[ref] if ref is not None else v
                sens[n].predicted[q] = ref or "layer"


def _check_layers(searched: list[int], k: int) -> list[int]:
    """Up to ``k`` unsearched layers, the midpoints of searched intervals spread over the depth."""
    mids = [(a + b) // 2 for a, b in zip(searched, searched[1:]) if b - a > 1]
    if not mids or k <= 0:
        return []
    pick = np.unique(np.round(np.linspace(0, len(mids) - 1, min(k, len(mids)))).astype(int))
    return [mids[i] for i in pick]


def _aq_prediction_check(sens: dict[str, TensorSensitivity], searched: dict[str, dict[str, float]],
                         keys_of: dict) -> dict:
    """Predicted against searched AQ layer errors of the held-out tensors."""
    items = [{"tensor": n, "type": q, "predicted": sens[n].error[q], "searched": e, "from": sens[n].predicted.get(q)}
             for n, d in searched.items() for q, e in d.items() if q in sens[n].error and q in sens[n].predicted]
    same = sum(_spearman([sens[n].error[q] for q in d], list(d.values())) > 0.999 for n, d in searched.items()
               if len(d) >= 3)
    p = np.asarray([i["predicted"] for i in items]) if items else np.zeros(0)
    r = np.asarray([i["searched"] for i in items]) if items else np.zeros(0)
    return {"layers": sorted({keys_of[n][0] for n in searched}), "pairs": len(items),
            "spearman": _spearman(p, r), "tensors": sum(len(d) >= 3 for d in searched.values()),
            "tensors_same_order": int(same),
            "ratio_median": float(np.median(r / np.maximum(p, 1e-30))) if items else float("nan"),
            "ratio_p10_p90": [float(np.percentile(r / np.maximum(p, 1e-30), x)) for x in (10, 90)] if items else [],
            "items": items}


def _check(sens: dict[str, TensorSensitivity], real_kld, n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    names = [s for s in sens if sens[s].alpha > 0 and len([q for q in sens[s].error if q != sens[s].ref
                                                           and not gguf_types.get(q).is_float]) > 0]
    pick = sorted(rng.choice(len(names), size=min(n, len(names)), replace=False))
    pairs = []
    for i in pick:
        ts = sens[names[i]]
        others = [q for q in ts.error if q != ts.ref and not gguf_types.get(q).is_float]
        q = others[int(rng.integers(len(others)))]
        pairs.append({"tensor": ts.name, "type": q, "predicted": ts.kld(q), "layer_error": ts.error[q],
                      "alpha_measured": bool(ts.ref),
                      "real": real_kld(ts.name, q)})
    pred = [p["predicted"] for p in pairs]
    real = [p["real"] for p in pairs]
    aq = [p for p in pairs if p["type"].lower().startswith("aq-")]
    return {"pairs": len(pairs), "spearman": _spearman(pred, real),
            "aq_pairs": len(aq), "spearman_aq": _spearman([p["predicted"] for p in aq], [p["real"] for p in aq]),
            "spearman_layer_error": _spearman([p["layer_error"] for p in pairs], real),
            "ratio_median": float(np.median(np.asarray(real) / np.maximum(1e-12, np.asarray(pred)))),
            "items": pairs}


__all__ = ["STANDARD_CANDIDATES", "AQ_CANDIDATES", "AQ_MEASURE", "AQ_SEARCH", "candidate_types", "TensorSensitivity",
           "Sensitivity", "measure", "predict_aq_errors"]
