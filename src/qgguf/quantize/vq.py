"""``--method vq``: VPTQ-style vector quantization (Liu et al., "VPTQ: Extreme Low-bit Vector Post-Training
Quantization for Large Language Models") onto qgguf's codebook types ``vq-vV-kK[-KR][-oP][-gG]``
(:mod:`qgguf.gguf_types.vq`, docs/FORMAT.md "VQ tensors").

Block by block, in the calibration pipeline (:mod:`.blockwise`), as the AQ method:

1. every linear of the block with a VQ type is quantized against its true-sequential Gram matrix
   (:func:`qgguf.quantize.vq_core.quantize_matrix`: act-order permutation, outlier columns, column
   normalisation, Hessian-weighted k-means of main and residual codebooks per codebook group, then the
   columns quantized one after another with GPTQ error feedback through the inverse Hessian); linears with a
   standard type take the ``other`` method (default ``imatrix``);
2. the block's codebooks (main, residual, outlier), column scales and biases and its RMSNorm weights are
   fine-tuned with Adam (indices frozen) against the original block's outputs - the AQ method's
   :func:`qgguf.quantize.finetune.finetune_block`, through :class:`VQState`.

Options (``-O KEY=VALUE``)::

    actorder=yes norm=yes damp=0.01 blocksize=128   act-order / column normalisation / GPTQ damping, lazy batch
    kmeans_iters=12 kmeans_points=32768 refit=no    k-means; refit: one more centroid update on the final
                                                    assignments (kept only if the layer error improves)
    finetune=yes ft_epochs=3 ft_lr=0.0005 ft_batch=4 ft_tol=0.001 ft_target=fp|xq   (as AQ)
    other=imatrix linear_threads=1 nsamples=32 seqlen=256

The configuration (``--vq-config``, ``--type vq-...``, or ``--bits B``: :func:`choose_config`, every byte
counted) and the tensors VQ applies to (``--tensor-method PATTERN=vq``) are decided before the type plan by
:func:`plan_vq`.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, fields as dc_fields, replace

import numpy as np
import torch

from ..errors import OptionError, QggufError
from .aq import AQ, LINEAR_KEYS, AQPlan, _as_bool, _coerce, _with_bar, _fallback_bytes, _write, head_types, parse_tensor_methods
from .finetune import FT_KEYS as _FT_KEYS
from .base import QuantContext
from .blockwise import sequential_quantize
from .vq_core import VQOptions, VQResult, dequantize, from_fields, quantize_matrix, to_fields

DEFAULT_CONFIG = "vq-v8-k256-256"
_VQ_KEYS = {f.name for f in dc_fields(VQOptions)}
_OTHER_KEYS = {"other", "linear_threads", "verbose", "tensor_methods", "vq_config", "nsamples", "seqlen", "seed"}
METHOD_DEFAULTS = dict(kmeans_iters=12, kmeans_points=1 << 15)


def vq_type_of(qtype):
    """The :class:`~qgguf.gguf_types.vq.VQType` of a type or type name (None: not a VQ type)."""
    from ..gguf_types.vq import VQType, parse_vq
    if isinstance(qtype, VQType):
        return qtype
    try:
        return parse_vq(getattr(qtype, "name", str(qtype)))
    except QggufError:
        return None


def parse_config(name: str):
    """``vq-...`` -> VQType; OptionError for anything else."""
    from ..gguf_types.vq import parse_vq
    try:
        qt = parse_vq(str(name))
    except QggufError as e:
        raise OptionError(f"VQ configuration {name!r}: {e.problem}") from None
    if qt is None:
        raise OptionError(f"VQ configuration {name!r}: expected vq-vV-kK[-KR][-oP][-gG], e.g. vq-v8-k4096-256")
    return qt


# ------------------------------------------------------------------------------------------------
# the state the block fine-tuning works on


@dataclass
class VQState:
    """One quantized linear for :func:`qgguf.quantize.finetune.finetune_block`: the float parts that may be
    tuned (all stored as float16), how the fine-tuning parametrises them, and the weight they give."""
    qt: object
    res: VQResult
    R: int
    C: int

    def tunables(self) -> dict:
        """name -> (start value, parametrisation, stored as float16): :class:`qgguf.quantize.finetune.Tunables`."""
        t = {"books": (self.res.books, "rms", True), "colscale": (self.res.colscale, "factor", True),
             "colbias": (self.res.colbias, "rms", True)}
        if self.res.rbooks is not None:
            t["rbooks"] = (self.res.rbooks, "rms", True)
        if self.res.obook is not None:
            t["obook"] = (self.res.obook, "rms", True)
        return t

    def weight(self, values: dict) -> torch.Tensor:
        return dequantize(self.qt, self.res, self.R, self.C, **values)

    def with_values(self, values: dict) -> "VQState":
        return VQState(self.qt, replace(self.res, **{k: v.detach() for k, v in values.items()}), self.R, self.C)

    def dequantized(self) -> torch.Tensor:
        return dequantize(self.qt, self.res, self.R, self.C)

    def pack(self, qtype) -> np.ndarray:
        return np.asarray(qtype.pack(to_fields(self.res)))

    @classmethod
    def from_packed(cls, qtype, data: np.ndarray, shape) -> "VQState":
        """The state of a VQ tensor's bytes (for the end-to-end stage, which starts from the checkpoint)."""
        qt = vq_type_of(qtype)
        R, C = int(shape[0]), int(shape[-1])
        return cls(qt, from_fields(qt, qtype.unpack(np.asarray(data).view(np.uint8), (R, C))), R, C)


# ------------------------------------------------------------------------------------------------
# the method


class VQ(AQ):
    """``--method vq`` (module docstring). Shares AQ's handling of non-codebook linears and its fine-tuning."""

    name = "vq"

    def __init__(self, calib=None, nsamples=None, seqlen=None, **options):
        options = {k: v for k, v in options.items() if k not in ("imatrix", "imatrix_out") and v is not None}
        unknown = set(options) - _VQ_KEYS - _FT_KEYS - _OTHER_KEYS
        if unknown:
            raise OptionError(f"unknown vq option(s): {', '.join(sorted(unknown))}; known: "
                              f"{', '.join(sorted(_VQ_KEYS | _FT_KEYS | {'other'}))}")
        self.vq = _coerce(VQOptions, {**METHOD_DEFAULTS, **{k: v for k, v in options.items() if k in _VQ_KEYS}})
        self._setup(calib, nsamples, seqlen, options, "vq")

    def describe(self) -> str:
        o = self.vq
        return (f"vq(actorder={o.actorder}, norm={o.norm}, damp={o.damp:g}, kmeans={o.kmeans_iters}x{o.kmeans_points}"
                f"{', refit' if o.refit else ''}") + self._describe_finetune()

    def _state_from_packed(self, qtype, data: np.ndarray, shape):
        return VQState.from_packed(qtype, data, shape) if vq_type_of(qtype) is not None else None

    def quantize_block(self, block, ctx: QuantContext) -> dict[str, np.ndarray]:
        nt = int((ctx.options or {}).get("linear_threads") or 1)
        state: dict[str, VQState] = {}
        keys = {v: k for k, v in block.names.items()}

        def quantize_linear(name, w, qtype, H, importance, ctx):
            qt = vq_type_of(qtype)
            if qt is None:
                return self._quantize_other(name, w, qtype, H, importance, ctx)
            key = keys[name]
            seed = (int(block.seed) * 31 + 1013 * (LINEAR_KEYS.index(key) + 1 if key in LINEAR_KEYS else 99)) % (2**63)
            res = _with_bar(ctx, f"blk.{block.index} {key} {qt.name}", 2, nt,
                            lambda progress: quantize_matrix(w, H, qt, self.vq, seed=seed, progress=progress))
            st = VQState(qt, res, int(w.shape[0]), int(w.shape[1]))
            state[key] = st
            if ctx.progress and _as_bool(ctx.options.get("verbose", False)):
                _write(f"vq blk.{block.index} {key}: rel err {res.rel_err:.4g} ({res.seconds:.1f} s)")
            return st.pack(qtype)

        packed = sequential_quantize(block, ctx, quantize_linear)
        self._finetune_block(block, packed, state, {}, ctx)
        return packed


# ------------------------------------------------------------------------------------------------
# choosing the configuration (--bits) and the tensors


def candidate_configs() -> list:
    """The configurations ``--bits`` chooses among: vectors of 4, 8 or 16; 16..65536 centroids; no residual
    or 2..64, 256, 1024, 4096 residual centroids; no outliers, 1 % or 2 %; 1, 2, 4 or 8 codebook groups."""
    from ..gguf_types.vq import vq_type
    out = []
    for v, kb, rb, o, g in itertools.product((4, 8, 16), range(4, 17), (0, 1, 2, 3, 4, 5, 6, 8, 10, 12), (0, 1, 2),
                                                (1, 2, 4, 8)):
        if rb and rb > kb:
            continue
        out.append(vq_type(v, 1 << kb, (1 << rb) if rb else 0, o, g))
    return out


def config_bpw(qt, shapes, fallback_type: str = "Q8_0") -> float:
    """Bits per weight of the tensors ``shapes`` ((rows, cols) each) in VQ type ``qt``, every byte counted
    (indices, codebooks, permutation, norms; tensors whose rows do not divide into vectors of ``v``: their
    fallback type)."""
    nb, n = 0, 0
    for shape in shapes:
        R, C = int(np.prod(shape[:-1])), int(shape[-1])
        nb += qt.nbytes((R, C)) if qt.fits_shape((R, C)) else _fallback_bytes((R, C), fallback_type)
        n += R * C
    return 8.0 * nb / max(1, n)


def _rank(qt) -> tuple:
    """Expected accuracy order (higher first): bits of indices per weight; at equal bits, one codebook
    over a main + residual pair (one exact nearest search instead of a greedy two-stage one), then more
    codebook groups, outlier columns, longer vectors. Measured on SmolLM2-135M layers (relative layer error,
    budget 2 bits: vq-v4-k128-o2-g8 0.054 at 1.96 bpw, vq-v4-k128 0.059 at 1.83, vq-v8-k256-64-o1 0.059
    at 1.96; budget 3 bits: vq-v4-k1024-2 0.0165 at 2.95, vq-v4-k512-4-o1 0.0174, vq-v4-k256-8-o2-g4 0.0175,
    vq-v4-k128-16-o2-g8 0.0190)."""
    return (round(qt.index_bits, 6), -qt.rbits, qt.groups, qt.outlier_pct, qt.v, qt.kbits)


def choose_config(shapes, bits: float, configs=None, fallback_type: str = "Q8_0", max_k: int = 4096):
    """The highest-ranked configuration (:func:`_rank`) whose true bits per weight over ``shapes`` is at most
    ``bits``. Codebooks of more than ``max_k`` entries are left out (k-means and decoding cost)."""
    configs = [c for c in (configs or candidate_configs()) if c.k <= max_k and (c.kr or 0) <= max_k]
    scored = [(c, config_bpw(c, shapes, fallback_type)) for c in configs]
    fit = [(c, b) for c, b in scored if b <= bits + 1e-9]
    if not fit:
        lo = min(scored, key=lambda t: t[1])
        raise OptionError(f"--bits {bits:g}: no VQ configuration fits this model (the smallest, {lo[0].name}, "
                          f"needs {lo[1]:.3f} bits per weight)")
    fit.sort(key=lambda t: (_rank(t[0]), -t[1]), reverse=True)
    return fit[0][0]


_LINEAR_RX = re.compile(r"^blk\.\d+\.(attn_(q|k|v|output)|ffn_(gate|up|down))\.weight$")


def plan_vq(tensors, *, type: str = "Q8_0", vq_config: str | None = None, bits: float | None = None,
            tensor_methods=(), tensor_types=(), token_embedding_type: str | None = None,
            output_tensor_type: str | None = None, method: str = "vq") -> AQPlan:
    """As :func:`qgguf.quantize.aq.plan_aq`, for VQ: the block linears (or those ``PATTERN=vq`` matches) get
    the configuration ``vq_config``, else ``type`` when it names one, else the best fit for ``bits``
    (:func:`choose_config`), else :data:`DEFAULT_CONFIG`; linears whose rows do not divide into vectors of
    ``v`` keep the standard type; token_embd / output: Q6_K when the rows divide into 256, else Q8_0."""
    shapes = {n: tuple(s) for n, s in tensors}
    tms = parse_tensor_methods(tensor_methods)
    from ..convert.presets import parse_tensor_types, resolve_preset
    user_tt = parse_tensor_types(tensor_types)
    want, other = [], None
    for n in sorted(shapes):
        if not _LINEAR_RX.match(n) or any(rx.search(n) for _p, rx, _t in user_tt):
            continue
        if tms:
            meth = next((m for _p, rx, m in tms if rx.search(n)), None)
            if meth == "vq":
                want.append(n)
            elif meth is not None and other is None:
                other = meth
        elif method == "vq":
            want.append(n)
    if not want:
        raise OptionError("VQ applies to no tensor (check --tensor-method patterns)")
    if vq_config:
        qt = parse_config(vq_config)
    elif str(type).strip().lower().startswith("vq-"):
        qt = parse_config(type)       # its own message for a malformed name
    else:
        qt = None
    std_type = type if vq_type_of(type) is None else "Q8_0"
    try:
        fb_type = resolve_preset(std_type)[2]
    except OptionError:
        fb_type = "Q8_0"
    if qt is None and bits is not None:
        qt = choose_config([shapes[n] for n in want], float(bits), fallback_type=fb_type)
    if qt is None:
        qt = parse_config(DEFAULT_CONFIG)
    names = [n for n in want if qt.fits_shape(shapes[n])]
    fallback = [n for n in want if not qt.fits_shape(shapes[n])]
    if not names:
        raise OptionError(f"{qt.name}: no tensor has rows that divide into vectors of {qt.v}")
    bpw = config_bpw(qt, [shapes[n] for n in want], fb_type)
    tt = [(re.escape(n), qt.name.upper()) for n in names] + [(p, t) for p, _rx, t in user_tt]
    tte, ote = head_types(shapes, token_embedding_type, output_tensor_type, None if tms else bits, tensor_types)
    return AQPlan(qt, std_type, names, fallback, bpw, tt, tte, ote, other)


__all__ = ["VQ", "VQState", "plan_vq", "choose_config", "config_bpw", "candidate_configs", "vq_type_of",
           "parse_config", "DEFAULT_CONFIG"]
