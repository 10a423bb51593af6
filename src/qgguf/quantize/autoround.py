"""``--method autoround``: AutoRound / SignRound (Cheng et al., "Optimize Weight Rounding via Signed Gradient
Descent for the Quantization of LLMs"; intel/auto-round) onto llama.cpp's block formats.

Block by block (the pipeline streams the transformer blocks in order, see :mod:`.blockwise`), every linear
weight ``W`` of the block gets

* a rounding offset ``V`` per weight, in ``[-0.5, 0.5]``, init 0: the code is ``round(W/scale + V)``;
* per group (a 32-weight block of the legacy types, a sub-block of 16/32 weights of the k-quants) range
  factors ``alpha`` (max side) and ``beta`` (min side), init 1, in ``[lo, hi]`` (``scale_bounds``);

and these are tuned with signed gradient descent to minimise the MSE between the quantized block's output
and the original one. As intel/auto-round does by default (``enable_quanted_input``), the quantized block is
fed ``x_q`` (the outputs of the already-quantized blocks, so the tuning corrects the error coming in) and the
target is the original block on ``x_fp`` (the float model's own activations).

What is tuned is exactly what is stored. The quantizer is written in the type's own arithmetic with a
straight-through estimator (STE) at every rounding:

* the starting scales are llama.cpp's importance-weighted search (``qtype.quantize(W, importance)``, the
  ``--method imatrix`` result), not the plain min/max of auto-round: a group's range ``[lo0, hi0]`` is the
  range of the grid llama.cpp chose (``lo0 = B0``, ``hi0 = A0*kmax + B0`` for the types with a min,
  ``scale0 = A0`` for the symmetric ones); the tuned range is ``[beta*lo0, alpha*hi0]`` (symmetric types:
  ``scale = alpha*scale0``) and the group's scale/min follow from it as the type computes them;
* legacy types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL): the scale (and min) are rounded to float16;
* k-quants (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K): the sub-block scales/mins are rounded to their 4/6/8-bit codes
  against the float16 super-scales ``d``/``dmin`` and clamped to the code range exactly as stored; with
  ``tune_super`` the super-scales get their own factor (float16-rounded);
* codes: ``k = clamp(round((W - B)/A + V) + center, 0, kmax)``, value ``A*LEVELS[k] + B`` in the order
  ggml dequantizes (see :mod:`.grid`); IQ4_NL rounds in the index space of its non-linear table
  (piecewise-linear), which is nearest rounding at ``V = 0``.

Start point ``init="gptq"`` (``--init gptq``): the block is first quantized by GPTQ (true-sequential Gram
matrices of the same calibration inputs, :mod:`.gptq`), and the tuning starts from GPTQ's scales *and codes*.
GPTQ's error feedback moves many codes off nearest rounding; each weight gets the integer offset between its
GPTQ code and its nearest code, so ``V = 0`` is exactly GPTQ's result and the signed-gradient search explores
``[-0.5, 0.5]`` around it. This combines error feedback (GPTQ), the importance-weighted scale search (GPTQ
chooses each block's scales with llama.cpp's search on the updated weights) and SignRound's tuning of the
rounding against the block output; GPTQ's own bytes are one more candidate of the final choice.
``init="quantease"`` does the same from QuantEase's coordinate-descent result (20 passes), which reaches a
lower layer error than GPTQ at 2-3 bits.

The final fields go through ``qtype.pack`` and the dequantized bytes are checked to be bit-identical to the
weights the last loss was computed with.

Optimiser (as auto-round): sign of the gradient, ``lr = 1/iters`` (both for ``V`` and the range factors),
decayed linearly to 0; one random mini-batch of ``batch_size`` calibration sequences per step; the best
iterate is kept. auto-round compares raw mini-batch losses; here the loss of a mini-batch is divided by the
loss the start point has on the same sequences (precomputed once), so that easy batches are not mistaken
for good iterates. At the end the best iterate, the importance-weighted start (llama.cpp's exact bytes) and
plain RTN are compared on the whole calibration set and the lowest loss wins: the result is never worse
than ``--method imatrix`` on the calibration data.

Recipes (``--recipe``; any field can be overridden as a method option)::

    recipe    iters  nsamples  seqlen  batch_size  lr        init     SmolLM2-135M block, 2 busy CPU cores
    light        50        64     256           2  1/iters   imatrix  ~25 s
    default     100        64     256           2  1/iters   gptq     ~50 s (30 blocks: ~30 min)
    best        200       128     512           4  1/iters   gptq     ~6 min

``default`` and ``best`` start from GPTQ (``init="gptq"``): on SmolLM2-135M (40 x 512 WikiText-2 KLD against
F32, Q2_K and Q3_K with llama.cpp's fallbacks) that start reached 0.339 and 0.193, where GPTQ alone gave
0.400 and 0.266 and llama.cpp with an importance matrix 0.425 and 0.284 (docs/BENCHMARKS.md). ``light`` keeps
the cheaper importance-weighted start; ``--init rtn`` (``-O init=rtn``) chooses it for any recipe.

Range factors: implemented (``enable_minmax=True``, bounds ``scale_bounds`` (0.5, 1.5), lr ``minmax_lr``,
default lr/10) but off in every recipe: on SmolLM2-135M (block 3, Q4_0/Q8_0/Q6_K, 100 iters) the block
MSE went 0.01027 (imatrix start) -> 0.00578 with V only, 0.00676 with range factors at auto-round's lr,
0.00598 at lr/10, 0.00684 with bounds (0.5, 1). Starting from llama.cpp's searched scales there is
little left for them to find, and their large moves disturb the rounding (intel/auto-round's own GGUF
double-quant path also disables them). The rounding tuning is what pays.

Options: ``init`` ("rtn" | "gptq" | "quantease"), ``gptq_damp`` (0.01), ``iters``, ``nsamples``, ``seqlen``, ``batch_size``, ``lr``, ``minmax_lr``, ``enable_minmax``
(False), ``scale_bounds`` ((0.5, 1.5)), ``tune_super`` (False: k-quant super-scale factors), ``seed``,
``threads_tune`` (torch threads of the tuning loop, default 1: on the shared 2-core machine a step of a
SmolLM2 block took 0.27 s with one thread and 4.9 s with two, the OpenMP threads spinning against the
other load).
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field, fields as dc_fields, replace
from typing import Any, Callable, Mapping

import numpy as np
import torch

from ..errors import OptionError, QggufError
from ..gguf_types.legacy import KVALUES_IQ4NL
from ..runtime.threads import torch_threads
from .base import Method, QuantContext
from .grid import SPECS, affine

try:  # the block-streaming interface (quantize/blockwise.py)
    from .blockwise import BlockMethod
except ImportError:  # pragma: no cover - until blockwise lands
    BlockMethod = Method

LINEAR_KEYS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
SUPPORTED = tuple(SPECS)          # Q8_0 Q4_0 Q4_1 Q5_0 Q5_1 IQ4_NL Q2_K Q3_K Q4_K Q5_K Q6_K


# ------------------------------------------------------------------------------------------------
# recipes
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Recipe:
    iters: int = 100
    nsamples: int = 64
    seqlen: int = 256
    batch_size: int = 2
    lr: float | None = None            # None: 1/iters
    minmax_lr: float | None = None     # None: lr/10
    enable_minmax: bool = False
    scale_bounds: tuple[float, float] = (0.5, 1.5)
    tune_super: bool = False
    seed: int = 0
    init: str = "rtn"                  # "rtn": llama.cpp's importance-weighted search; "gptq" / "quantease":
                                       # that method's result on the block (true-sequential Gram matrices)
    gptq_damp: float = 0.01

    @property
    def lr_value(self) -> float:
        return float(self.lr) if self.lr is not None else 1.0 / max(1, self.iters)

    @property
    def minmax_lr_value(self) -> float:
        return float(self.minmax_lr) if self.minmax_lr is not None else self.lr_value / 10


#: block methods whose codes AutoRound can start from (``init``)
START_METHODS = ("gptq", "quantease")

RECIPES: dict[str, Recipe] = {
    "light": Recipe(iters=50, nsamples=64, seqlen=256, batch_size=2),
    "default": Recipe(iters=100, nsamples=64, seqlen=256, batch_size=2, init="gptq"),
    "best": Recipe(iters=200, nsamples=128, seqlen=512, batch_size=4, init="gptq"),
}

RECIPE_HELP = ("autoround recipes: light (50 iters), default (100 iters), best (200 iters, 128 x 512 tokens, "
               "mini-batches of 4); light/default: 64 calibration sequences of 256 tokens, mini-batches of 2; "
               "signed gradient descent on the rounding, lr 1/iters decayed linearly, from GPTQ's codes "
               "(light: from llama.cpp's importance-weighted scales) (~50 s per SmolLM2-135M block at default on 2 CPU cores)")


def make_recipe(name: str = "default", **overrides) -> Recipe:
    if name not in RECIPES:
        raise OptionError(f"unknown autoround recipe {name!r}; known: {', '.join(RECIPES)}")
    r = RECIPES[name]
    known = {f.name for f in dc_fields(Recipe)}
    kw = {}
    for k, v in overrides.items():
        if v is None or k not in known:
            continue
        if k in ("iters", "nsamples", "seqlen", "batch_size", "seed"):
            v = int(v)
            if v < (0 if k in ("iters", "seed") else 1):
                raise OptionError(f"autoround {k} must be {'>= 0' if k in ('iters', 'seed') else '>= 1'}, got {v}")
        elif k == "init":
            v = str(v).lower()
            if v not in ("rtn", "imatrix", "gptq", "quantease"):
                raise OptionError(f"autoround init must be rtn, gptq or quantease, got {v!r}")
            v = "rtn" if v == "imatrix" else v
        elif k == "gptq_damp":
            v = float(v)
            if not (0 <= v < 10):
                raise OptionError(f"autoround gptq_damp must be in [0, 10), got {v}")
        elif k in ("lr", "minmax_lr"):
            v = float(v)
            if not (v >= 0 and math.isfinite(v)):
                raise OptionError(f"autoround {k} must be a non-negative number, got {v}")
        elif k in ("enable_minmax", "tune_super"):
            v = v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes", "on")
        elif k == "scale_bounds":
            if isinstance(v, str):
                v = tuple(float(p) for p in v.replace(":", ",").split(","))
            v = tuple(float(p) for p in v)
            if len(v) != 2 or not (0 < v[0] <= 1.0 <= v[1]):
                raise OptionError(f"autoround scale_bounds must be lo,hi with 0 < lo <= 1 <= hi, got {v}")
        kw[k] = v
    return replace(r, **kw)


# ------------------------------------------------------------------------------------------------
# STE helpers
# ------------------------------------------------------------------------------------------------
_F16_MAX = 65504.0


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def f16_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to float16 (RNE, as numpy's astype) in the forward pass, identity in the backward pass."""
    h = x.detach().clamp(-_F16_MAX, _F16_MAX).to(torch.float16).to(torch.float32)
    return x + (h - x).detach()


def clamp_ste_free(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Clamp with zero gradient outside (torch.clamp's gradient), as auto-round."""
    return torch.clamp(x, lo, hi)


def _safe(a: torch.Tensor) -> torch.Tensor:
    return torch.where(a == 0, torch.ones_like(a), a)


# code ranges of the k-quant sub-block scales/mins: (lo, hi, field offset)
_K_SCALE_CODES = {"Q2_K": (0, 15, 0), "Q3_K": (-32, 31, 32), "Q4_K": (0, 63, 0), "Q5_K": (0, 63, 0),
                  "Q6_K": (-128, 127, 0)}
_KV = torch.tensor(KVALUES_IQ4NL.astype(np.float32))


# ------------------------------------------------------------------------------------------------
# one weight matrix
# ------------------------------------------------------------------------------------------------
class TypeQuantizer:
    """The STE quantizer of one weight matrix ``W`` (rows, n) onto ``qtype``'s grid.

    ``qdq(params)`` returns the quantized weights (torch float32, differentiable through the STE) and, with
    ``want_fields=True``, the type's fields as numpy arrays (what :meth:`pack` stores). Parameters
    (``init_params``): ``V`` (rows, ngroups, group), ``alpha``/``beta`` (rows, ngroups, 1), ``gd``/``gm``
    (rows, nb, 1, 1) super-scale factors (k-quants, ``tune_super``)."""

    def __init__(self, qtype, W: np.ndarray, importance: np.ndarray | None = None, *, start_fields=None):
        self.qtype = qtype
        name = qtype.name.upper()
        if name not in SPECS:
            raise QggufError(f"autoround has no grid for type {qtype.name} (supported: {', '.join(SPECS)})")
        sp = self.spec = SPECS[name]
        self.name = name
        W = np.ascontiguousarray(W, dtype=np.float32)
        if W.ndim != 2:
            raise QggufError(f"autoround needs a matrix, got shape {W.shape}")
        qtype.check_row_length(W.shape[1])
        self.rows, self.n = rows, n = W.shape
        self.G = G = sp.sub
        self.ng = ng = n // G
        self.nb = nb = n // sp.block_size
        self.nsub = sp.block_size // G
        self.kquant = sp.block_size == 256
        self.sym = not sp.has_offset
        self.kmax = sp.nlevels - 1
        self.center = sp.center
        self.levels = torch.from_numpy(sp.levels.copy())
        self.W_np = W
        self.W = torch.from_numpy(W).reshape(rows, ng, G)
        if start_fields is None:
            imp = None if importance is None else np.ascontiguousarray(importance, np.float32).reshape(-1)
            start_fields = qtype.unpack(qtype.quantize(W, imp))
        self.start_fields = start_fields
        self.shift: torch.Tensor | None = None   # integer code offsets of a start that is not nearest rounding
        A, B = affine(name, start_fields)                                   # per weight (rows, n)
        A0 = torch.from_numpy(np.ascontiguousarray(A[:, ::G])).reshape(rows, ng, 1)
        B0 = torch.from_numpy(np.ascontiguousarray(B[:, ::G])).reshape(rows, ng, 1)
        if self.sym:
            self.s0 = A0
        else:
            self.lo0 = B0
            self.hi0 = A0 * float(self.kmax) + B0
        if self.kquant:
            self.d0 = torch.from_numpy(np.asarray(start_fields["d"], np.float32).copy()).reshape(rows, nb, 1, 1)
            if not self.sym:
                self.dmin0 = torch.from_numpy(np.asarray(start_fields["dmin"], np.float32).copy()).reshape(
                    rows, nb, 1, 1)

    # --- parameters -------------------------------------------------------------------------------
    def init_params(self, enable_minmax: bool = True, tune_super: bool = False) -> dict[str, torch.Tensor]:
        p = {"V": torch.zeros(self.rows, self.ng, self.G)}
        if enable_minmax:
            p["alpha"] = torch.ones(self.rows, self.ng, 1)
            if not self.sym:
                p["beta"] = torch.ones(self.rows, self.ng, 1)
        if tune_super and self.kquant:
            p["gd"] = torch.ones(self.rows, self.nb, 1, 1)
            if not self.sym:
                p["gm"] = torch.ones(self.rows, self.nb, 1, 1)
        return p

    # --- forward ----------------------------------------------------------------------------------
    def _sub(self, t: torch.Tensor) -> torch.Tensor:      # (rows, nb, 1, 1) -> (rows, ng, 1)
        return t.expand(self.rows, self.nb, self.nsub, 1).reshape(self.rows, self.ng, 1)

    def qdq(self, p: Mapping[str, torch.Tensor], want_fields: bool = False):
        V = p.get("V")
        alpha = p.get("alpha")
        beta = p.get("beta")
        rows, nb, nsub = self.rows, self.nb, self.nsub
        fields: dict[str, np.ndarray] = {}
        # --- scales ------------------------------------------------------------------------------
        if self.sym:
            s = self.s0 if alpha is None else alpha * self.s0
        else:
            lo = self.lo0 if beta is None else beta * self.lo0
            hi = self.hi0 if alpha is None else alpha * self.hi0
            s = (hi - lo) / float(self.kmax)
        if not self.kquant:
            A = f16_ste(s)
            B = None if self.sym else f16_ste(lo)
            if want_fields:
                fields["d"] = A.detach().reshape(rows, nb).numpy().astype(np.float16)
                if B is not None:
                    fields["m"] = B.detach().reshape(rows, nb).numpy().astype(np.float16)
        else:
            clo, chi, coff = _K_SCALE_CODES[self.name]
            d4 = self.d0 if p.get("gd") is None else f16_ste(self.d0 * p["gd"])
            d = self._sub(d4)
            code = torch.clamp(round_ste(s / _safe(d)), clo, chi)
            code = torch.where(d == 0, torch.zeros_like(code), code)
            A = d * code
            if self.sym:
                B = None
            else:
                m4 = self.dmin0 if p.get("gm") is None else f16_ste(self.dmin0 * p["gm"])
                dm = self._sub(m4)
                mcode = torch.clamp(round_ste(-lo / _safe(dm)), clo, chi)
                mcode = torch.where(dm == 0, torch.zeros_like(mcode), mcode)
                B = -(dm * mcode)
            if want_fields:
                fields["d"] = d4.detach().reshape(rows, nb).numpy().astype(np.float16)
                c = code.detach().reshape(rows, nb, nsub).numpy().astype(np.int64) + coff
                fields["scales"] = c.astype(np.int8 if self.name == "Q6_K" else np.uint8)
                if not self.sym:
                    fields["dmin"] = m4.detach().reshape(rows, nb).numpy().astype(np.float16)
                    fields["mins"] = mcode.detach().reshape(rows, nb, nsub).numpy().astype(np.uint8)
        # --- codes -------------------------------------------------------------------------------
        W = self.W
        if self.name == "IQ4_NL":
            kv = _KV
            t = W / _safe(A)
            tc = t.clamp(float(kv[0]), float(kv[-1]))
            i0 = (torch.searchsorted(kv, tc.detach().contiguous(), right=True) - 1).clamp(0, 14)
            k0v = kv[i0]
            slope = kv[i0 + 1] - k0v
            u = i0.to(torch.float32) + (tc - k0v) / slope        # index space, differentiable in W/A
            if self.shift is not None:
                u = u + self.shift
            if V is not None:
                u = u + V
            k = torch.clamp(round_ste(u), 0.0, 15.0)
            kf = k.detach().to(torch.long)
            # value d*kv[k]: forward exact, backward d*slope per index unit (piecewise linear table)
            j0 = k.detach().clamp(0, 14).to(torch.long)
            lin = kv[j0] + (k - j0.to(torch.float32)) * (kv[j0 + 1] - kv[j0])
            val = A * (lin + (kv[kf] - lin).detach())
        else:
            if B is None:
                t = W / _safe(A)
            else:
                t = (W - B) / _safe(A)
            if self.shift is not None:
                t = t + self.shift
            if V is not None:
                t = t + V
            k = torch.clamp(round_ste(t) + float(self.center), 0.0, float(self.kmax))
            kf = k.detach().to(torch.long)
            val = A * (k - float(self.center))
            if B is not None:
                val = val + B
        if want_fields:
            q = kf.reshape(rows, nb, self.spec.block_size).numpy() + self.spec.field_offset
            fields["q"] = q.astype(np.int8 if self.spec.field_offset else np.uint8)
        Wq = val.reshape(rows, self.n)
        return (Wq, fields) if want_fields else Wq

    def start_from_codes(self) -> int:
        """Make ``V = 0`` reproduce the codes of ``start_fields`` (e.g. GPTQ's, whose error feedback moves codes
        away from nearest rounding): each weight gets the integer offset between its start code and its nearest
        code under the start scales, so the signed-gradient search explores ``[-0.5, 0.5]`` around the start
        point instead of around plain rounding. Returns how many codes differ from nearest rounding."""
        self.shift = None
        with torch.no_grad():
            _, near = self.qdq({}, want_fields=True)
        target = np.asarray(self.start_fields["q"]).astype(np.int64)
        diff = target.reshape(self.rows, self.ng, self.G) - near["q"].astype(np.int64).reshape(self.rows, self.ng,
                                                                                                   self.G)
        self.shift = torch.from_numpy(diff.astype(np.float32))
        # exceptions: a weight whose nearest code was clamped at an end of the grid (step by the remaining
        # difference), or whose shifted position is a rounding tie (round half to even; step by half of it)
        tgt = target.reshape(diff.shape)
        for i in range(12):
            with torch.no_grad():
                _, got = self.qdq({}, want_fields=True)
            rest = tgt - got["q"].astype(np.int64).reshape(diff.shape)
            if not rest.any():
                break
            self.shift = self.shift + torch.from_numpy(((1.0 if i < 6 else 0.5) * rest).astype(np.float32))
        # (a code still off here - not seen in practice - only makes the start differ from GPTQ's at that
        # weight; GPTQ's own bytes stay a candidate of the final choice)
        return int((diff != 0).sum())

    def pack(self, p: Mapping[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        """(packed bytes, float32 weights the bytes dequantize to); checks they equal the STE forward."""
        with torch.no_grad():
            Wq, f = self.qdq(p, want_fields=True)
        data = self.qtype.pack(f)
        deq = self.qtype.dequantize(data)
        wq = Wq.numpy()
        if not np.array_equal(deq, wq):
            bad = int((deq != wq).sum())
            raise QggufError(f"autoround: {self.name} packed weights differ from the tuned ones at {bad} places")
        return data, deq


# ------------------------------------------------------------------------------------------------
# one block
# ------------------------------------------------------------------------------------------------
@dataclass
class BlockResult:
    packed: dict[str, np.ndarray]
    weights: dict[str, np.ndarray]            # dequantized, as packed
    loss: float                               # full-calibration MSE of the chosen result
    losses: dict[str, float] = field(default_factory=dict)   # candidate -> full-calibration MSE
    chosen: str = "tuned"
    best_iter: int = -1
    seconds: float = 0.0
    y: torch.Tensor | None = None             # the block's output on x_q with the chosen weights


def _chunks(n: int, bs: int):
    for a in range(0, n, bs):
        yield slice(a, min(n, a + bs))


def _default_forward():
    from ..runtime.model import block_forward
    return block_forward


def autoround_block(hp, weights: Mapping[str, np.ndarray], qtypes: Mapping[str, Any], x_q, x_fp,
                    importance: Mapping[str, np.ndarray] | None = None, recipe: Recipe | None = None,
                    forward: Callable | None = None, log: Callable[[str], None] | None = None,
                    rope=None, eval_chunk: int | None = None,
                    start: Mapping[str, np.ndarray] | None = None) -> BlockResult:
    """AutoRound of one transformer block.

    ``weights``: float32 by short key (norms and linears, (out, in)); ``qtypes``: output type per linear
    short key; ``x_q`` / ``x_fp``: (nsamples, seqlen, n_embd) inputs from the quantized / float model;
    ``importance``: llama.cpp importance vectors per linear short key (the start point's search weights).
    ``forward(hp, w, x)``: the block's float32 forward (default :func:`qgguf.runtime.model.block_forward`);
    ``rope``: its (cos, sin) tables when the model needs them (passed on as ``forward(..., rope=rope)``);
    ``eval_chunk``: samples per forward pass of the whole-set evaluations (default ``batch_size``); the
    chosen result's block output on ``x_q`` is returned in ``BlockResult.y``. ``start``: packed bytes per
    linear short key to start the tuning from (GPTQ's, ``init="gptq"``) instead of the importance-weighted
    search; they are also a candidate of the final choice."""
    t0 = time.perf_counter()
    r = recipe or RECIPES["default"]
    fwd0 = forward or _default_forward()
    fwd = fwd0 if rope is None else (lambda hp_, w_, x_: fwd0(hp_, w_, x_, rope=rope))
    importance = importance or {}
    x_q = torch.as_tensor(np.asarray(x_q, np.float32) if not isinstance(x_q, torch.Tensor) else x_q,
                          dtype=torch.float32)
    x_fp = torch.as_tensor(np.asarray(x_fp, np.float32) if not isinstance(x_fp, torch.Tensor) else x_fp,
                           dtype=torch.float32)
    if x_q.shape != x_fp.shape or x_q.ndim != 3:
        raise QggufError(f"autoround: x_q {tuple(x_q.shape)} and x_fp {tuple(x_fp.shape)} must be equal 3-D shapes")
    N = x_q.shape[0]
    bs = max(1, min(r.batch_size, N))
    ec = max(1, int(eval_chunk or bs))

    fixed: dict[str, torch.Tensor] = {}
    tuners: dict[str, TypeQuantizer] = {}
    other_packed: dict[str, np.ndarray] = {}
    other_w: dict[str, np.ndarray] = {}
    rtn_w: dict[str, torch.Tensor] = {}
    imx_w: dict[str, torch.Tensor] = {}
    imx_packed: dict[str, np.ndarray] = {}
    start_packed: dict[str, np.ndarray] = {}
    start_w: dict[str, torch.Tensor] = {}
    rtn_packed: dict[str, np.ndarray] = {}
    w_fp = {k: torch.from_numpy(np.ascontiguousarray(v, np.float32)) for k, v in weights.items()}
    for k, v in weights.items():
        qt = qtypes.get(k)
        if qt is None:
            fixed[k] = w_fp[k]
            continue
        W = np.ascontiguousarray(v, np.float32)
        imp = importance.get(k)
        if imp is not None and (np.asarray(imp).reshape(-1).shape[0] != W.shape[-1]):
            imp = None
        if getattr(qt, "is_float", False) or qt.name.upper() not in SPECS or W.ndim != 2:
            data = qt.quantize(W, imp if not getattr(qt, "is_float", False) else None)
            other_packed[k] = data
            other_w[k] = qt.dequantize(data, W.shape)
            fixed[k] = torch.from_numpy(other_w[k])
            continue
        data = qt.quantize(W, imp)
        imx_packed[k] = data
        imx_w[k] = torch.from_numpy(qt.dequantize(data, W.shape))
        if start is not None and k in start:
            sd = np.ascontiguousarray(start[k]).view(np.uint8).reshape(W.shape[0], -1)
            start_packed[k] = sd
            start_w[k] = torch.from_numpy(qt.dequantize(sd, W.shape))
            tuners[k] = TypeQuantizer(qt, W, imp, start_fields=qt.unpack(sd))
            moved = tuners[k].start_from_codes()
            if log is not None:
                log(f"  {k}: start has {moved} codes off nearest rounding")
        else:
            tuners[k] = TypeQuantizer(qt, W, imp, start_fields=qt.unpack(data))
        if imp is not None:
            rd = qt.quantize(W)
            rtn_packed[k] = rd
            rtn_w[k] = torch.from_numpy(qt.dequantize(rd, W.shape))

    # targets: the float block on the float inputs
    with torch.no_grad():
        y_fp = torch.cat([fwd(hp, w_fp, x_fp[sl]) for sl in _chunks(N, ec)], 0)

    def per_sample_sse(wd: Mapping[str, torch.Tensor], keep: bool = False):
        out = []
        ys = []
        with torch.no_grad():
            for sl in _chunks(N, ec):
                y = fwd(hp, wd, x_q[sl])
                out.append(((y - y_fp[sl]) ** 2).flatten(1).sum(1).to(torch.float64))
                if keep:
                    ys.append(y)
        sse = torch.cat(out)
        return (sse, torch.cat(ys, 0)) if keep else sse

    numel = y_fp[0].numel()
    params = {k: t.init_params(r.enable_minmax, r.tune_super) for k, t in tuners.items()}
    with torch.no_grad():
        start_w = {k: t.qdq(params[k]) for k, t in tuners.items()}
    sse_start = per_sample_sse({**fixed, **start_w}).clamp_min(1e-30)

    # --- signed gradient descent ---------------------------------------------------------------------
    lr, mlr = r.lr_value, r.minmax_lr_value
    lo_b, hi_b = r.scale_bounds
    gen = torch.Generator().manual_seed(int(r.seed))
    best_rel = math.inf
    best_iter = -1
    best = {k: {n: v.clone() for n, v in p.items()} for k, p in params.items()}
    order = torch.randperm(N, generator=gen)
    pos = 0
    flat = [(k, n, v) for k, p in params.items() for n, v in p.items()]
    for _, _, v in flat:
        v.requires_grad_(True)
    for it in range(r.iters):
        if pos + bs > N:
            order = torch.randperm(N, generator=gen)
            pos = 0
        idx = order[pos:pos + bs]
        pos += bs
        wq = {k: t.qdq(params[k]) for k, t in tuners.items()}
        y = fwd(hp, {**fixed, **wq}, x_q[idx])
        diff = y - y_fp[idx]
        loss = (diff * diff).mean()
        rel = float(loss.detach()) * numel * len(idx) / float(sse_start[idx].sum())
        if rel < best_rel:
            best_rel = rel
            best_iter = it
            best = {k: {n: v.detach().clone() for n, v in p.items()} for k, p in params.items()}
        if log is not None and (it % max(1, r.iters // 5) == 0 or it == r.iters - 1):
            log(f"  iter {it}: loss {float(loss.detach()):.4g} (x{rel:.3f} of the start on this batch)")
        grads = torch.autograd.grad(loss, [v for _, _, v in flat], allow_unused=True)
        decay = 1.0 - it / r.iters
        with torch.no_grad():
            for (k, n, v), g in zip(flat, grads):
                if g is None:
                    continue
                if n == "V":
                    v.sub_(lr * decay * torch.sign(g)).clamp_(-0.5, 0.5)
                else:
                    v.sub_(mlr * decay * torch.sign(g)).clamp_(lo_b, hi_b)

    # --- choose among the best iterate, the importance-weighted start and RTN --------------------------
    tuned_packed: dict[str, np.ndarray] = {}
    tuned_w: dict[str, np.ndarray] = {}
    for k, t in tuners.items():
        tuned_packed[k], tuned_w[k] = t.pack(best[k])
    denom = float(N * numel)
    cands: dict[str, tuple[dict, dict]] = {}
    if tuners:
        cands["tuned"] = (tuned_packed, {k: torch.from_numpy(v) for k, v in tuned_w.items()})
        cands["imatrix"] = (imx_packed, imx_w)
        if start_packed and len(start_packed) == len(tuners):
            cands[r.init if r.init in START_METHODS else "start"] = (start_packed, start_w)
        if len(rtn_w) == len(tuners):
            cands["rtn"] = (rtn_packed, rtn_w)
    losses = {}
    outs = {}
    for name, (_, wd) in cands.items():
        sse, outs[name] = per_sample_sse({**fixed, **wd}, keep=True)
        losses[name] = float(sse.sum()) / denom
    if not cands:
        chosen = "none"
        sse, y_out = per_sample_sse(fixed, keep=True)
        packed, wout, loss = {}, {}, float(sse.sum()) / denom
    else:
        chosen = min(losses, key=lambda c: (losses[c], c != "tuned"))
        packed = dict(cands[chosen][0])
        wout = {k: np.asarray(v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in cands[chosen][1].items()}
        loss = losses[chosen]
        y_out = outs[chosen]
    del outs
    packed.update(other_packed)
    wout.update(other_w)
    res = BlockResult(packed=packed, weights=wout, loss=loss, losses=losses, chosen=chosen, best_iter=best_iter,
                      seconds=time.perf_counter() - t0, y=y_out)
    if log is not None:
        log("  " + ", ".join(f"{c} {v:.5g}" for c, v in losses.items()) + f" -> {chosen} "
            f"(best iter {best_iter}, {res.seconds:.1f} s)")
    return res


# ------------------------------------------------------------------------------------------------
# the method
# ------------------------------------------------------------------------------------------------
class AutoRound(BlockMethod):
    """``--method autoround`` (block-wise; see the module docstring). Options: ``recipe`` plus any
    :class:`Recipe` field."""

    name = "autoround"
    needs_calibration = True
    recipe_names = tuple(RECIPES)
    recipe_help = RECIPE_HELP

    def __init__(self, recipe: str | None = None, **options):
        self.recipe_name = recipe or "default"
        self.recipe = make_recipe(self.recipe_name, **options)
        self.calib = options.get("calib")
        self.options = options
        t = options.get("threads_tune")
        self.threads = max(1, int(t)) if t else 1
        # what the pipeline should collect for calibration
        self.nsamples = self.recipe.nsamples
        self.seqlen = self.recipe.seqlen

    def describe(self) -> str:
        r = self.recipe
        return (f"autoround(recipe={self.recipe_name}, iters={r.iters}, nsamples={r.nsamples}, "
                f"seqlen={r.seqlen}, batch_size={r.batch_size}, lr={r.lr_value:.4g}, init={r.init})")

    def quantize_block(self, block, ctx: QuantContext) -> dict[str, np.ndarray]:
        known = {f.name for f in dc_fields(Recipe)}
        opts = {k: v for k, v in (ctx.options or {}).items() if k in known and v is not None}
        r = make_recipe(self.recipe_name, **{**_fields_of(self.recipe), **opts}) if opts else self.recipe
        r = replace(r, seed=int(getattr(block, "seed", 0)) + int(r.seed))
        index = getattr(block, "index", 0)
        log = None
        if ctx.progress and ctx.options.get("verbose"):
            def log(msg: str) -> None:
                _write(f"autoround block {index}: {msg.strip()}")
        x_fp = block.x_fp if block.x_fp is not None else block.x_q
        start = self._start_codes(block, ctx, r) if r.init in START_METHODS and hasattr(block, "chunks") else None
        weights = block.current() if hasattr(block, "current") else block.weights
        weights = {k: (v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v)) for k, v in weights.items()}
        with torch_threads(self.threads):
            res = autoround_block(block.hp, weights, block.qtypes, block.x_q, x_fp,
                                  importance=getattr(block, "importance", None), recipe=r, log=log,
                                  rope=getattr(block, "rope", None), eval_chunk=getattr(block, "chunk", None),
                                  start=start)
        if hasattr(block, "x_out") and res.chosen != "none":
            block.x_out = res.y
        stats = getattr(block, "stats", None)
        imp = getattr(block, "importance", None) or {}
        if isinstance(stats, dict):
            for k in block.qtypes:       # importance-weighted relative error of each linear
                w = weights[k].astype(np.float64)
                d = res.weights[k].astype(np.float64) - w
                v = imp.get(k)
                v = np.ones(w.shape[-1]) if v is None else np.asarray(v, np.float64).reshape(-1)
                den = float(((w * w) @ v).sum())
                stats[k] = float(((d * d) @ v).sum()) / den if den > 0 else 0.0
        if ctx.progress:
            ls = res.losses
            _write(f"autoround block {index}: block MSE {res.loss:.4g} ({res.chosen}; imatrix start "
                   f"{ls.get('imatrix', float('nan')):.4g}, rtn {ls.get('rtn', float('nan')):.4g}), "
                   f"{res.seconds:.0f} s")
        ctx.extra.setdefault("block_loss", {})[index] = {
            "method": "autoround", "loss": res.loss, "losses": res.losses, "chosen": res.chosen,
            "best_iter": res.best_iter, "seconds": res.seconds}
        return res.packed


    @staticmethod
    def _start_codes(block, ctx: QuantContext, r: Recipe) -> dict[str, np.ndarray]:
        """GPTQ or QuantEase on this block (true-sequential Gram matrices of the same calibration inputs
        ``x_q``): the start point of ``init="gptq"`` / ``init="quantease"``, so that the signed-gradient tuning
        refines that method's rounding."""
        from .blockwise import GramAdapter, sequential_quantize
        from .gptq import GPTQ
        from .quantease import QuantEase

        saved = dict(block.stats)
        if ctx.grams is None:
            ctx.grams = {}
        method = GPTQ(damp=r.gptq_damp) if r.init == "gptq" else QuantEase()
        # the start method sees only its own prefixed options ("quantease.passes=..."), not AutoRound's
        opts = ctx.options
        ctx.options = {k: v for k, v in (opts or {}).items() if k.startswith(method.name + ".")}
        try:
            packed = sequential_quantize(block, ctx, GramAdapter(method).quantize_linear)
        finally:
            ctx.options = opts
        block.stats.clear()
        block.stats.update(saved)
        return packed


def _write(msg: str) -> None:
    try:
        from tqdm import tqdm
        tqdm.write(msg, file=sys.stderr)
    except ImportError:  # pragma: no cover
        print(msg, file=sys.stderr, flush=True)


def _fields_of(r: Recipe) -> dict[str, Any]:
    return {f.name: getattr(r, f.name) for f in dc_fields(Recipe)}


__all__ = ["AutoRound", "Recipe", "RECIPES", "RECIPE_HELP", "make_recipe", "TypeQuantizer", "autoround_block",
           "BlockResult", "round_ste", "f16_ste"]
