"""The block-by-block calibration pipeline shared by GPTQ, QuantEase, AutoRound (and later AQ/VQ).

Flow (:func:`run_blocks`, called by :func:`qgguf.convert.pipeline.convert` for block methods):

1. calibration token sequences (:mod:`.calib`: a text/JSONL file, a Hugging Face dataset name, or ``self``),
   ``nsamples x seqlen``, deterministic by ``seed``;
2. their embeddings ``x`` (``nsamples, seqlen, n_embd`` float32; the float token embeddings);
3. for each transformer block in order, a :class:`Block`: its index, hyper-parameters, original float32
   weights under short keys (``attn_q``, ..., ``ffn_down``, ``attn_norm``, ``ffn_norm``, ``attn_q.bias``...),
   the output type of every linear the method quantizes, the GGUF names, ``x_q`` (the block's inputs through
   the already-quantized blocks) and, for methods that set ``needs_fp_inputs``, ``x_fp`` (the same samples
   through the original model). The method returns the packed bytes of each linear
   (:meth:`BlockMethod.quantize_block`); the block's dequantized weights (plus any sparse outliers) then
   produce the next block's ``x_q``;
4. each finished block's bytes go to a checkpoint folder beside the output (``OUT.qgguf-resume/``); with
   ``resume=True`` finished blocks are skipped (their ``x_q`` contribution recomputed from the checkpointed
   bytes), so a killed run continues and, with the same settings, gives the same bytes;
5. a method with a ``finish_model`` hook then gets the whole model (:class:`ModelRun`: the checkpoint, the
   calibration tokens and the float model's final hidden states of them) and may rewrite the checkpointed blocks
   (AQ/VQ's end-to-end fine-tuning, :mod:`.finetune`); it records itself in the checkpoint (``mark``) so a
   resumed run skips it;
6. the tensors outside the blocks (``token_embd``, ``output``) are quantized by the type's own
   importance-weighted search, the output matrix with the importance of the quantized model's final hidden
   states. With a ``finish_model`` stage this happens before the stage (:func:`_head_tensors`, kept in the
   checkpoint as ``head.npz``), so that the stage sees them as stored; the writer takes those bytes.

The default :meth:`BlockMethod.quantize_block` is "true-sequential" (GPTQ's ``--true-sequential``): q, k, v
are quantized against the Gram matrix ``H = X^T X`` of ``attn_norm(x_q)``; ``attn_output`` against the
attention output computed with the *quantized* q, k, v; ``ffn_gate``/``ffn_up`` against ``ffn_norm`` of the
residual after the quantized attention; ``ffn_down`` against ``silu(gate) * up`` of the quantized
gate/up. So every linear sees inputs produced by the already-quantized linears before it. A method only
implements :meth:`BlockMethod.quantize_linear` (``name, w, qtype, H, importance, ctx -> bytes``).

Per-tensor methods that read ``ctx.grams[name]`` (GPTQ, QuantEase) run through :class:`GramAdapter`.

Memory: a few activation sets of ``nsamples x seqlen x width`` float32 (x_q, the residual after attention,
the FFN hidden state; x_fp when needed) and one float64 Gram matrix per input group, freed when used.
Work is done in chunks of samples (:func:`chunk_samples`), the same chunks in every pass, so the staged
computation of the true-sequential driver and :meth:`Block.forward` give the same bits.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..errors import OptionError, OutputError, QggufError
from ..gguf_types import is_codebook
from ..gguf_types.tiers import is_tiered
from ..runtime import model as rm
from ..runtime.threads import set_torch_threads, torch_threads
from .base import Method, QuantContext, quantize_with

#: tokens per chunk of the block passes (samples per chunk = max(1, CHUNK_TOKENS // seqlen))
CHUNK_TOKENS = 16384
RESUME_SUFFIX = ".qgguf-resume"
_CKPT_VERSION = 1


def resume_folder(out) -> Path:
    """``OUT.qgguf-resume/``: the block checkpoints of the conversion writing ``out`` (:class:`Checkpoint`)."""
    out = Path(out)
    return out.with_name(out.name + RESUME_SUFFIX)


def chunk_samples(seqlen: int) -> int:
    return max(1, CHUNK_TOKENS // max(1, int(seqlen)))


def short_key(name: str, index: int) -> str | None:
    """``blk.3.attn_q.weight`` -> ``attn_q``; ``blk.3.attn_q.bias`` -> ``attn_q.bias`` (None: not block ``index``)."""
    p = f"blk.{index}."
    if not name.startswith(p):
        return None
    k = name[len(p):]
    return k[: -len(".weight")] if k.endswith(".weight") else k


# ------------------------------------------------------------------------------------------------
# Blocks


@dataclass
class Block:
    """One transformer block handed to :meth:`BlockMethod.quantize_block`.

    ``weights``: original float32 weights by short key (numpy orientation (out, in); norms (n,));
    ``qtypes``: the linears the method quantizes -> output :class:`QuantType`; ``fixed``: the final (file)
    values of the block's other tensors (norms, float-typed or copied linears); ``names``: short key ->
    GGUF name; ``x_q``/``x_fp``: (nsamples, seqlen, n_embd) float32; ``rope``: (cos, sin) tables;
    ``chunk``: samples per pass chunk; ``seed``: a per-block seed (``hash(seed, index)``) for methods that
    draw random numbers (resume needs per-block determinism); ``imatrix``: importance vectors by short key
    from a given ``--imatrix`` file (else None). A method may set ``x_out`` (the block's output through
    the quantized weights, exactly as :meth:`forward` would compute it) to save a pass; ``stats`` collects
    per-linear relative errors for the progress display and the report."""
    index: int
    hp: Any
    weights: dict[str, torch.Tensor]
    qtypes: dict[str, Any]
    names: dict[str, str]
    x_q: torch.Tensor
    x_fp: torch.Tensor | None = None
    fixed: dict[str, torch.Tensor] = field(default_factory=dict)
    rope: tuple | None = None
    chunk: int = 32
    seed: int = 0
    imatrix: dict[str, np.ndarray] | None = None
    x_out: torch.Tensor | None = None
    stats: dict[str, float] = field(default_factory=dict)
    _importance: dict[str, np.ndarray] | None = None

    @property
    def nsamples(self) -> int:
        return int(self.x_q.shape[0])

    @property
    def ntokens(self) -> int:
        return int(self.x_q.shape[0] * self.x_q.shape[1])

    def chunks(self, n: int | None = None):
        """Slices of samples, the same for every pass (of ``n`` samples; default the block's)."""
        n = self.nsamples if n is None else int(n)
        for s in range(0, n, self.chunk):
            yield slice(s, min(s + self.chunk, n))

    def current(self, quantized: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Weights for a forward pass: originals, overridden by ``fixed`` and then by ``quantized``."""
        w = dict(self.weights)
        w.update(self.fixed)
        if quantized:
            w.update(quantized)
        return w

    @torch.no_grad()
    def forward(self, w: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """:func:`qgguf.runtime.model.block_forward` of all samples of ``x``, chunk by chunk (``x`` may have
        other samples than the block's: the end-to-end stage's extra sequences)."""
        out = torch.empty_like(x)
        for sl in self.chunks(x.shape[0]):
            out[sl] = rm.block_forward(self.hp, w, x[sl], self.rope)
        return out

    def target(self) -> torch.Tensor:
        """The original block's output on ``x_fp`` (AutoRound's target); needs ``x_fp``."""
        if self.x_fp is None:
            raise QggufError("this block has no x_fp (set needs_fp_inputs on the method)")
        return self.forward(self.current(), self.x_fp)

    @property
    def importance(self) -> dict[str, np.ndarray]:
        """llama.cpp importance vectors (mean x^2 of each linear's inputs) by short key, from ``x_q``
        through the original weights (or from the ``--imatrix`` file when given). Computed on first use."""
        if self._importance is None:
            sums: dict[str, torch.Tensor] = {}
            w = self.current()
            eps = self.hp.norm_eps
            with torch.no_grad():
                for sl in self.chunks():
                    x = self.x_q[sl]
                    n = rm.rms_norm(x, w["attn_norm"], eps)
                    a = rm.attention(self.hp, w, n, self.rope)
                    x1 = x + rm.linear(w, "attn_output", a)
                    m = rm.rms_norm(x1, w["ffn_norm"], eps)
                    h = rm.ffn_hidden(w, m)
                    for key, t in (("qkv", n), ("attn_output", a), ("gate_up", m), ("ffn_down", h)):
                        s = t.reshape(-1, t.shape[-1]).double().pow(2).sum(0)
                        sums[key] = sums[key] + s if key in sums else s
            N = float(self.ntokens)
            imp = {k: (v / N).float().numpy() for k, v in sums.items()}
            out = {}
            for k in rm.BLOCK_LINEARS:
                g = {"attn_q": "qkv", "attn_k": "qkv", "attn_v": "qkv", "ffn_gate": "gate_up", "ffn_up": "gate_up"}
                out[k] = imp[g.get(k, k)]
            if self.imatrix:
                out.update({k: v for k, v in self.imatrix.items() if v is not None})
            self._importance = out
        return self._importance

    def dequantized(self, key: str, packed: np.ndarray, ctx: QuantContext | None = None) -> torch.Tensor:
        """The float32 weight that ``packed`` (bytes of ``qtypes[key]``) stands for, plus the sparse
        outliers the method left in ``ctx.extra["outliers"][name]``."""
        qt = self.qtypes[key]
        shape = tuple(self.weights[key].shape)
        w = np.array(qt.dequantize(np.asarray(packed), shape), dtype=np.float32)
        sp = ((ctx.extra.get("outliers") or {}).get(self.names[key]) if ctx is not None else None)
        if sp is not None:
            idx, vals = sp
            np.add.at(w.reshape(-1), np.asarray(idx, np.int64), np.asarray(vals, np.float32))
        return torch.from_numpy(w)


def _gram_add(acc: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """``acc += X^T X`` (float32 products of one chunk, accumulated in float64). Wide inputs are done in
    column blocks, upper triangle only, and mirrored (about 2/3 of the multiply-adds of a full product)."""
    x2 = x.reshape(-1, x.shape[-1])
    n = x2.shape[1]
    if acc is None:
        acc = torch.zeros(n, n, dtype=torch.float64)
    s = max(1, min(4, n // 256))
    cuts = [i * n // s for i in range(s + 1)]
    for i in range(s):
        a0, a1 = cuts[i], cuts[i + 1]
        xa = x2[:, a0:a1]
        for j in range(i, s):
            c0, c1 = cuts[j], cuts[j + 1]
            g = (xa.T @ x2[:, c0:c1]).double()
            acc[a0:a1, c0:c1] += g
            if j != i:
                acc[c0:c1, a0:a1] += g.T
    return acc


def relative_error(w: torch.Tensor, wq: torch.Tensor, H: torch.Tensor, max_rows: int = 128) -> float:
    """``tr(dW H dW^T) / tr(W H W^T)``: the layer's relative output error on the calibration inputs
    (estimated on every k-th row when the matrix has more than ``max_rows`` rows)."""
    step = max(1, -(-w.shape[0] // max_rows))
    Hf = H.to(torch.float32)
    W = w[::step].to(torch.float32)
    both = torch.cat((wq[::step].to(torch.float32) - W, W))
    p = ((both @ Hf) * both).sum(1)
    num, den = float(p[: W.shape[0]].sum()), float(p[W.shape[0]:].sum())
    return num / den if den > 0 else 0.0


QuantizeLinear = Callable[[str, np.ndarray, Any, np.ndarray, np.ndarray, QuantContext], np.ndarray]


@torch.no_grad()
def _cross_add(acc: torch.Tensor | None, xq: torch.Tensor, xf: torch.Tensor) -> torch.Tensor:
    """``acc += Xq^T Xfp`` (float32 products of one chunk, accumulated in float64)."""
    a = xq.reshape(-1, xq.shape[-1])
    b = xf.reshape(-1, xf.shape[-1])
    if acc is None:
        acc = torch.zeros(a.shape[1], b.shape[1], dtype=torch.float64)
    acc += (a.T @ b).double()
    return acc


def fp_target_weights(w: np.ndarray, H: np.ndarray, C: np.ndarray, damp: float = 0.01) -> np.ndarray:
    """The weights whose outputs on the quantized model's inputs best match the float model's outputs on its
    own inputs: ``argmin_V ||Xq V^T - Xfp W^T||^2 = W C^T H^-1`` with ``H = Xq^T Xq`` (damped by ``damp`` x its
    mean diagonal) and ``C = Xq^T Xfp``. Quantizing these against ``H`` (GPTQ, QuantEase) minimises the error
    to the float model's layer output instead of to the layer's output on already-perturbed inputs (the
    "asymmetric calibration" of GPTAQ, Li et al. 2025): the error that earlier layers let in is corrected too."""
    Hd = np.array(H, dtype=np.float64, copy=True)
    diag = np.diag(Hd)
    lam = float(damp) * float(diag.mean()) if diag.size and diag.mean() > 0 else 1.0
    Hd[np.diag_indices_from(Hd)] += lam
    rhs = np.asarray(C, np.float64) @ np.asarray(w, np.float64).T       # (in, out)
    try:
        sol = np.linalg.solve(Hd, rhs)
    except np.linalg.LinAlgError:
        return np.asarray(w, np.float32)
    out = sol.T.astype(np.float32)
    return out if np.isfinite(out).all() else np.asarray(w, np.float32)


def sequential_quantize(block: Block, ctx: QuantContext, quantize_linear: QuantizeLinear,
                        grams_out: dict[str, np.ndarray] | None = None,
                        fp_target: bool | None = None) -> dict[str, np.ndarray]:
    """True-sequential quantization of one block (module docstring). ``quantize_linear(name, w, qtype, H,
    importance, ctx) -> packed bytes`` is called for each linear in ``block.qtypes`` (``name`` its GGUF
    name, ``w`` float32 (rows, ncols), ``H`` float64 (ncols, ncols) = X^T X over all calibration tokens,
    ``importance`` float32 (ncols,) = diag(H)/tokens or the ``--imatrix`` vector). Sets ``block.x_out``.
    ``grams_out`` (tests): receives each H by short key. ``fp_target`` (default: method option
    ``target=fp`` when the block has ``x_fp``): each linear is quantized from :func:`fp_target_weights`, the
    weights that map its quantized-model inputs to the float model's outputs, instead of its own weights."""
    hp, eps = block.hp, block.hp.norm_eps
    quant: dict[str, torch.Tensor] = {}
    packed: dict[str, np.ndarray] = {}
    w = block.current()
    w0 = dict(w)
    N = float(block.ntokens)
    if fp_target is None:
        fp_target = str((ctx.options or {}).get("target", "")).lower() == "fp"
    fp_target = bool(fp_target) and block.x_fp is not None
    damp = float((ctx.options or {}).get("damp") or 0.01)

    def do(keys: tuple[str, ...], H: torch.Tensor | None, C: torch.Tensor | None = None) -> None:
        keys = tuple(k for k in keys if k in block.qtypes)
        if not keys:
            return
        Hn = H.numpy()
        Cn = C.numpy() if C is not None else None
        for k in keys:
            if grams_out is not None:
                grams_out[k] = Hn
            imp = None
            if block.imatrix and block.imatrix.get(k) is not None:
                imp = np.asarray(block.imatrix[k], np.float32)
            if imp is None:
                imp = (np.diag(Hn) / N).astype(np.float32)
            wk = np.ascontiguousarray(block.weights[k].numpy(), dtype=np.float32)
            if Cn is not None:
                wk = fp_target_weights(wk, Hn, Cn, damp)
            data = quantize_linear(block.names[k], wk, block.qtypes[k], Hn, imp, ctx)
            data = np.ascontiguousarray(data).view(np.uint8)
            if not is_codebook(block.qtypes[k]):   # codebook types: one flat blob of their companions
                data = data.reshape(wk.shape[0], -1)
            packed[k] = data
            quant[k] = block.dequantized(k, data, ctx)
            w[k] = quant[k]
            block.stats[k] = relative_error(block.weights[k], quant[k], H)

    def need(*keys) -> bool:
        return any(k in block.qtypes for k in keys)

    # the float model's path on x_fp (only with fp_target): its residual after attention, kept between stages
    x1_fp = torch.empty_like(block.x_q) if fp_target else None

    def cx(acc, xq, xf):
        return _cross_add(acc, xq, xf) if fp_target else None

    # 1. q, k, v <- attn_norm(x_q)
    if need("attn_q", "attn_k", "attn_v"):
        H = C = None
        for sl in block.chunks():
            nq = rm.rms_norm(block.x_q[sl], w["attn_norm"], eps)
            H = _gram_add(H, nq)
            if fp_target:
                C = cx(C, nq, rm.rms_norm(block.x_fp[sl], w0["attn_norm"], eps))
        do(("attn_q", "attn_k", "attn_v"), H, C)
        del H, C
    # 2. attn_output <- attention with the quantized q, k, v
    a = torch.empty(block.x_q.shape[:2] + (hp.n_head * hp.head_dim_v,))
    H = C = None
    for sl in block.chunks():
        a[sl] = rm.attention(hp, w, rm.rms_norm(block.x_q[sl], w["attn_norm"], eps), block.rope)
        if fp_target:
            a_fp = rm.attention(hp, w0, rm.rms_norm(block.x_fp[sl], w0["attn_norm"], eps), block.rope)
            x1_fp[sl] = block.x_fp[sl] + rm.linear(w0, "attn_output", a_fp)
        if need("attn_output"):
            H = _gram_add(H, a[sl])
            if fp_target:
                C = cx(C, a[sl], a_fp)
    do(("attn_output",), H, C)
    # 3. ffn_gate, ffn_up <- ffn_norm of the residual after the quantized attention
    x1 = torch.empty_like(block.x_q)
    H = C = None
    for sl in block.chunks():
        x1[sl] = block.x_q[sl] + rm.linear(w, "attn_output", a[sl])
        if need("ffn_gate", "ffn_up"):
            mq = rm.rms_norm(x1[sl], w["ffn_norm"], eps)
            H = _gram_add(H, mq)
            if fp_target:
                C = cx(C, mq, rm.rms_norm(x1_fp[sl], w0["ffn_norm"], eps))
    del a
    do(("ffn_gate", "ffn_up"), H, C)
    # 4. ffn_down <- silu(gate) * up of the quantized gate/up
    h = torch.empty(block.x_q.shape[:2] + (hp.n_ff,))
    H = C = None
    for sl in block.chunks():
        h[sl] = rm.ffn_hidden(w, rm.rms_norm(x1[sl], w["ffn_norm"], eps))
        if need("ffn_down"):
            H = _gram_add(H, h[sl])
            if fp_target:
                C = cx(C, h[sl], rm.ffn_hidden(w0, rm.rms_norm(x1_fp[sl], w0["ffn_norm"], eps)))
    del x1_fp
    do(("ffn_down",), H, C)
    del H, C
    # 5. the block's output through the quantized weights (the next block's x_q)
    out = torch.empty_like(block.x_q)
    for sl in block.chunks():
        out[sl] = x1[sl] + rm.linear(w, "ffn_down", h[sl])
    block.x_out = out
    return packed


# ------------------------------------------------------------------------------------------------
# Methods


class BlockMethod(Method):
    """A method that quantizes one transformer block at a time with calibration activations.

    Override :meth:`quantize_linear` (per linear, with its true-sequential Gram matrix) or
    :meth:`quantize_block` (the whole block, e.g. AutoRound's block-output objective; set
    ``needs_fp_inputs = True`` to get ``block.x_fp``). Tensors outside the blocks go through
    :meth:`quantize_tensor` (default: the type's own importance-weighted search)."""

    name = "block"
    needs_calibration = True
    blockwise = True
    #: the method wants ``block.x_fp`` (inputs through the original model; one more activation set and
    #: one more block forward per block). Methods that only use :meth:`quantize_linear` can set False.
    needs_fp_inputs = True

    def __init__(self, calib=None, nsamples: int = 128, seqlen: int = 512, **options):
        self.calib, self.nsamples, self.seqlen = calib, nsamples, seqlen
        self.options = options

    def finish_samples(self, nsamples: int) -> int:
        """How many calibration sequences a ``finish_model`` stage wants (at least ``nsamples``, the block
        pass's): the extra ones are drawn after the block pass's and only run through the float model."""
        return nsamples

    def quantize_block(self, block: Block, ctx: QuantContext) -> dict[str, np.ndarray]:
        """Packed uint8 bytes ``(rows, row_bytes)`` for every short key in ``block.qtypes``. A method that also
        tunes float tensors of the block (AQ's RMSNorm weights) returns their new values as float32 arrays under
        their short keys (``attn_norm``, ``ffn_norm``); the pipeline writes those instead of the originals."""
        return sequential_quantize(block, ctx, self.quantize_linear)

    def quantize_linear(self, name: str, w: np.ndarray, qtype, H: np.ndarray, importance: np.ndarray,
                        ctx: QuantContext) -> np.ndarray:
        raise NotImplementedError(f"{type(self).__name__} implements neither quantize_block nor quantize_linear")

    def quantize_tensor(self, name: str, w: np.ndarray, qtype, ctx: QuantContext) -> np.ndarray:
        imp = None if qtype.is_float else ctx.importance_for(name, w.shape[-1])
        return qtype.quantize(w, imp)


class GramAdapter(BlockMethod):
    """A per-tensor :class:`Method` that reads ``ctx.grams[name]`` (GPTQ, QuantEase) run block by block
    with true-sequential Gram matrices."""

    needs_fp_inputs = False

    def __init__(self, inner: Method):
        self.inner = inner
        self.name = inner.name
        self.needs_fp_inputs = bool(getattr(inner, "needs_fp_inputs", False))

    def describe(self) -> str:
        return self.inner.describe()

    def prepare(self, source, plan, ctx: QuantContext) -> None:
        self.inner.prepare(source, plan, ctx)

    def quantize_linear(self, name, w, qtype, H, importance, ctx):
        """Runs the inner method with ``ctx.grams[name] = H`` and torch limited to ``linear_threads``
        threads (option, default 1: the per-column work of GPTQ is many small operations, which extra
        threads slow down, badly so on a busy machine; the block passes keep all threads)."""
        if ctx.importance is None:
            ctx.importance = {}
        ctx.grams[name] = H
        ctx.importance[name] = importance
        nt = int((ctx.options or {}).get("linear_threads") or 1)
        saved_threads, ctx.threads = ctx.threads, None
        try:
            with torch_threads(nt):
                return self.inner.quantize_tensor(name, w, qtype, ctx)
        finally:
            ctx.threads = saved_threads
            ctx.grams.pop(name, None)
            ctx.importance.pop(name, None)


def as_block_method(m: Method) -> BlockMethod:
    if isinstance(m, BlockMethod):
        return m
    return GramAdapter(m)


# ------------------------------------------------------------------------------------------------
# Checkpoints


class Checkpoint:
    """``OUT.qgguf-resume/``: ``run.json`` (the settings), ``blk.N.npz`` per finished block (packed
    tensors ``t/NAME``, outliers ``i/NAME`` and ``v/NAME``, and ``stats`` as JSON) and, for a method with a
    ``finish_model`` stage, ``head.npz``: the tensors outside the blocks that the stage uses as stored
    (``token_embd``, ``output``; ``output_norm`` once the stage tuned it), in the same layout."""

    def __init__(self, folder: Path, fingerprint: dict, resume: bool):
        self.folder = folder
        self.fingerprint = fingerprint
        run = folder / "run.json"
        if folder.exists() and resume:
            try:
                old = json.loads(run.read_text())
            except (OSError, json.JSONDecodeError):
                old = None
            if old is not None and old != fingerprint:
                diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
                raise OptionError(f"the checkpoint in {folder} was made with other settings ({', '.join(diff)}); "
                                  "remove it or run without --resume")
            if old is None:
                self._clear()
        elif folder.exists():
            self._clear()
        folder.mkdir(exist_ok=True)
        if not run.exists():
            self._atomic(run, json.dumps(fingerprint, indent=1, sort_keys=True).encode())

    def _clear(self) -> None:
        for p in self.folder.glob("*"):
            if p.is_file() and (p.name == "run.json"
                                or p.name.startswith(("blk.", ".blk.", "stage.", ".stage.", "head.", ".head."))):
                p.unlink()

    @staticmethod
    def _atomic(path: Path, data: bytes) -> None:
        tmp = path.with_name("." + path.name + ".tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:   # disk full, folder gone: one clear line, no half-written checkpoint file
            try:
                tmp.unlink()
            except OSError:
                pass
            raise OutputError(f"cannot write the block checkpoint: {e.strerror or e}", path) from None

    def path(self, index: int | str) -> Path:
        return self.folder / (f"blk.{index}.npz" if not isinstance(index, str) else f"{index}.npz")

    def has(self, index: int | str) -> bool:
        return self.path(index).is_file()

    def save(self, index: int | str, tensors: dict[str, np.ndarray], outliers: dict[str, tuple], stats: dict) -> None:
        import io
        arrs = {f"t/{k}": np.ascontiguousarray(v).view(np.uint8) for k, v in tensors.items()}
        for k, (idx, vals) in outliers.items():
            arrs[f"i/{k}"] = np.asarray(idx, np.int32)
            arrs[f"v/{k}"] = np.asarray(vals, np.float16)
        arrs["stats"] = np.frombuffer(json.dumps(stats, sort_keys=True).encode(), np.uint8)
        buf = io.BytesIO()
        np.savez(buf, **arrs)
        self._atomic(self.path(index), buf.getvalue())

    def load(self, index: int | str) -> tuple[dict[str, np.ndarray], dict[str, tuple], dict]:
        try:
            with np.load(self.path(index)) as z:
                tensors = {k[2:]: z[k] for k in z.files if k.startswith("t/")}
                outl = {k[2:]: (z[k], z["v/" + k[2:]]) for k in z.files if k.startswith("i/")}
                stats = json.loads(bytes(z["stats"]).decode()) if "stats" in z.files else {}
        except (OSError, ValueError, KeyError) as e:
            raise OptionError(f"damaged checkpoint {self.path(index)} ({e}); remove it and run again") from None
        return tensors, outl, stats

    def stage(self, name: str) -> dict | None:
        """What a finished stage after the blocks (``mark``) recorded, or None when it has not finished."""
        p = self.folder / f"stage.{name}.json"
        try:
            return json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def mark(self, name: str, info: dict) -> None:
        """Record that a stage after the blocks (the end-to-end fine-tuning) finished and rewrote the blocks."""
        self._atomic(self.folder / f"stage.{name}.json", json.dumps(info, sort_keys=True).encode())

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def fingerprint(source, plan, method, options: dict, calib, nsamples: int, seqlen: int, seed: int) -> dict:
    p = Path(source.path)
    try:
        st = p.stat()
        size, mtime = st.st_size, int(st.st_mtime)
    except OSError:
        size, mtime = None, None
    return {"version": _CKPT_VERSION, "source": str(p.resolve()), "source_size": size, "source_mtime": mtime,
            "types": {c.name: c.type for c in plan.choices}, "method": method.describe(),
            "options": {k: repr(v) for k, v in sorted(options.items())}, "calib": str(calib), "nsamples": nsamples,
            "seqlen": seqlen, "seed": seed}


# ------------------------------------------------------------------------------------------------
# The driver


@dataclass
class ModelRun:
    """What :func:`run_blocks` hands to a method's ``finish_model`` hook once every block is in the checkpoint
    (AQ/VQ's end-to-end fine-tuning): the source, plan and types, the checkpoint, hyper-parameters, rope tables,
    the calibration tokens ``ids`` (nsamples, seqlen), the float model's final hidden states of them
    ``teacher`` (nsamples, seqlen, n_embd; before the output norm) and ``head``."""
    source: Any
    plan: Any
    qtypes: dict
    checkpoint: "Checkpoint"
    hp: Any
    rope: Any
    ids: torch.Tensor
    teacher: torch.Tensor
    seed: int = 0
    progress: bool = True
    head: dict = None          # GGUF name -> stored bytes of the tensors outside the blocks (_head_tensors); a
                               # stage that tunes one of them (output_norm) puts its new bytes here


@dataclass
class BlockResult:
    """What :func:`run_blocks` leaves for the writer."""
    checkpoint: Checkpoint
    importance: dict[str, np.ndarray]          # for the tensors outside the blocks (output matrix)
    outliers: dict[str, int]                   # GGUF name -> count
    stats: dict[str, float]                    # GGUF name -> relative layer error
    resumed_blocks: int
    dataset: str
    head: dict = None                          # GGUF name -> bytes the writer takes as they are (_head_tensors)


def _tensor_bytes(choice, qt, source, method: Method, ctx: QuantContext, src_type: str) -> np.ndarray:
    """Bytes of a tensor the block method does not quantize itself (as the plain pipeline writes it)."""
    if method.copy_same_type and src_type == choice.type and hasattr(source, "file"):
        return np.ascontiguousarray(source.file.raw(choice.name)).view(np.uint8)
    w = np.asarray(source.load(choice.name), dtype=np.float32).reshape(-1, choice.shape[-1])
    if not choice.quantize or qt.is_float:
        return qt.quantize(w)
    return quantize_with(method, choice.name, w, qt, ctx)


@torch.no_grad()
def token_probabilities(h: torch.Tensor, w_out: torch.Tensor, chunk: int = 512) -> np.ndarray:
    """Mean next-token probability of every vocabulary row over the final normed hidden states ``h`` (N, n_embd)
    and output matrix ``w_out`` (n_vocab, n_embd): the ranking of a row-tiered output matrix."""
    p = torch.zeros(w_out.shape[0], dtype=torch.float64)
    for s in range(0, h.shape[0], chunk):
        p += torch.softmax(h[s:s + chunk] @ w_out.T, -1).double().sum(0)
    return (p / max(1, h.shape[0])).numpy()


def run_blocks(source, plan, qtypes: dict, method: BlockMethod, ctx: QuantContext, out: Path, *,
               calib=None, nsamples: int = 128, seqlen: int = 512, seed: int = 0, resume: bool = False,
               options: dict | None = None, imatrix: dict[str, np.ndarray] | None = None,
               progress: bool = True, stop_after: int | None = None) -> BlockResult:
    """Quantize every block of ``source`` into the checkpoint folder beside ``out`` (module docstring).
    ``stop_after`` (tests): raise ``KeyboardInterrupt`` after that many blocks were quantized."""
    from ..runtime.model import hparams_from_metadata

    if ctx.threads:
        set_torch_threads(int(ctx.threads))
    ckpt = Checkpoint(resume_folder(out),
                      fingerprint(source, plan, method, options or {}, calib, nsamples, seqlen, seed), resume)
    specs = {t.name: t for t in source.tensors}
    names = set(specs)
    choices = {c.name: c for c in plan.choices}
    md = {k: v.value for k, v in source.metadata.items()}
    md["general.architecture"] = source.arch
    emb = np.array(source.load("token_embd.weight"), dtype=np.float32)
    hp = hparams_from_metadata(md, emb.shape[0], source.path)

    # calibration tokens: the block pass's, then the extra sequences a finish_model stage asks for (they only go
    # through the float model: x_fp carries them after the block pass's samples, which are all a block sees)
    finish = getattr(method, "finish_model", None)
    n_fp = max(nsamples, int(method.finish_samples(nsamples))) if finish is not None and method.needs_fp_inputs \
        else nsamples
    seqs, dataset = _calibration(source, md, names, calib, n_fp, seqlen, seed, progress, ctx.threads)
    ids_fp = torch.tensor(seqs, dtype=torch.long)
    ids = ids_fp[:nsamples]
    T = int(ids.shape[1])
    rope_freqs = (torch.from_numpy(np.asarray(source.load("rope_freqs.weight"), np.float32).reshape(-1))
                  if "rope_freqs.weight" in names else None)
    rope = rm.rope_tables(hp, T, rope_freqs)
    x_q = rm.embed(torch.from_numpy(emb), ids)
    x_fp = None
    if method.needs_fp_inputs:
        x_fp = x_q if len(ids_fp) == len(ids) else rm.embed(torch.from_numpy(emb), ids_fp)
    del emb
    chunk = chunk_samples(T)

    stats_all: dict[str, float] = {}
    outlier_counts: dict[str, int] = {}
    resumed = 0
    done_now = 0
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=hp.n_layer, desc=f"{method.name} blocks", unit="blk", leave=False)
    try:
        for il in range(hp.n_layer):
            members = [c for c in plan.choices if short_key(c.name, il) is not None]
            keys = {short_key(c.name, il): c.name for c in members}
            weights = {k: torch.from_numpy(np.array(source.load(n), dtype=np.float32).reshape(choices[n].shape))
                       for k, n in keys.items()}
            x_out = None
            if ckpt.has(il):
                tensors, outl, st = ckpt.load(il)
                resumed += 1
            else:
                t0 = time.perf_counter()
                tensors, fixed, qkeys = {}, {}, {}
                for k, n in keys.items():
                    c = choices[n]
                    qt = qtypes[c.type]
                    if (k in rm.BLOCK_LINEARS and c.quantize and not qt.is_float
                            and not (method.copy_same_type and specs[n].src_type == c.type and hasattr(source, "file"))):
                        qkeys[k] = qt
                    else:
                        tensors[n] = _tensor_bytes(c, qt, source, method, ctx, specs[n].src_type)
                        fixed[k] = _deq(qt, tensors[n], c.shape)
                blk = Block(index=il, hp=hp, weights=weights, qtypes=qkeys, names=keys, x_q=x_q,
                            x_fp=x_fp[:len(ids)] if x_fp is not None else None,
                            fixed=fixed, rope=rope, chunk=chunk, seed=_block_seed(seed, il),
                            imatrix=({k: imatrix.get(n) for k, n in keys.items()} if imatrix else None))
                ctx.extra.setdefault("outliers", {})
                packed = method.quantize_block(blk, ctx) if qkeys else {}
                missing = set(qkeys) - set(packed)
                if missing:
                    raise QggufError(f"{method.name} returned no data for {sorted(missing)} of block {il}")
                for k in sorted(set(packed) - set(qkeys)):   # float tensors the method tuned (AQ's RMSNorm weights)
                    n = keys.get(k)
                    if n is not None and not choices[n].quantize:
                        c = choices[n]
                        tensors[n] = qtypes[c.type].quantize(np.asarray(packed[k], np.float32).reshape(-1, c.shape[-1]))
                outl = {}
                for k, qt in qkeys.items():
                    n = keys[k]
                    data = np.ascontiguousarray(packed[k]).view(np.uint8).reshape(-1)
                    if data.size != qt.nbytes(choices[n].shape):
                        raise QggufError(f"{method.name}: {n} has {data.size} bytes, expected "
                                         f"{qt.nbytes(choices[n].shape)} for {qt.name}")
                    tensors[n] = data
                    sp = ctx.extra["outliers"].pop(n, None)
                    if sp is not None and len(sp[0]):
                        idx = np.asarray(sp[0], np.int64)
                        order = np.argsort(idx, kind="stable")
                        outl[n] = (idx[order].astype(np.int32), np.asarray(sp[1], np.float16)[order])
                st = {keys[k]: float(v) for k, v in blk.stats.items()}
                st["_seconds"] = time.perf_counter() - t0
                ckpt.save(il, tensors, outl, st)
                x_out = blk.x_out
                del blk, fixed
            # the block's final weights -> the next block's inputs
            final = {k: stored_weight(qtypes[choices[n].type], tensors[n], choices[n].shape, outl.get(n))
                     for k, n in keys.items()}
            for n, (idx, _) in outl.items():
                outlier_counts[n] = int(len(idx))
            stats_all.update({n: v for n, v in st.items() if not n.startswith("_")})
            fw = Block(index=il, hp=hp, weights=weights, qtypes={}, names=keys, x_q=x_q, rope=rope, chunk=chunk)
            x_next = x_out if x_out is not None else fw.forward(final, x_q)
            if x_fp is not None:
                x_fp = fw.forward(weights, x_fp)
            x_q = x_next
            del tensors, final, weights, fw, x_out
            if bar is not None:
                errs = {n.split(".")[2]: v for n, v in st.items() if not n.startswith("_")}
                if errs:
                    worst = max(errs, key=errs.get)
                    bar.set_postfix_str(f"rel err mean {np.mean(list(errs.values())):.2e}, max {errs[worst]:.2e} "
                                        f"({worst})", refresh=False)
                bar.update(1)
            done_now += 1
            if stop_after is not None and done_now - resumed >= stop_after and il + 1 < hp.n_layer:
                raise KeyboardInterrupt(f"stopped after block {il} (test)")
    finally:
        if bar is not None:
            bar.close()

    # importance of the output matrix: the quantized model's final hidden states (before a finish_model stage)
    on = np.array(source.load("output_norm.weight"), np.float32).reshape(-1)
    h = rm.final_norm(hp, torch.from_numpy(on), x_q).reshape(-1, hp.n_embd).double()
    out_name = "output.weight" if "output.weight" in names else "token_embd.weight"
    imp = {out_name: (h.pow(2).sum(0) / h.shape[0]).float().numpy()}
    probs = None
    for n in HEAD_TENSORS:   # a head tensor in a codebook type (AQ) is fitted against the whole Gram matrix of
        c = choices.get(n)   # those states (an untied embedding too: the head's inputs as its proxy, as in
        if c is None:        # quantize/sensitivity.py)
            continue
        if is_tiered(qtypes[c.type]):   # row-tiered: its rows ranked by their tokens' mean probability (an untied
            if probs is None:           # embedding by the output matrix's, computed once)
                probs = token_probabilities(h.float(), torch.from_numpy(
                    np.array(source.load(out_name), np.float32)).reshape(-1, hp.n_embd))
            ctx.extra.setdefault("row_weights", {})[n] = probs
        elif is_codebook(qtypes[c.type]):
            ctx.grams[n] = (h.T @ h).float().numpy()
    del h
    head: dict[str, np.ndarray] = {}
    if finish is not None and x_fp is not None:   # a stage over the whole model (AQ/VQ: end-to-end fine-tuning)
        head = _head_tensors(ckpt, choices, qtypes, source, method, ctx, specs, {**imp, **(imatrix or {})})
        finish(ModelRun(source, plan, qtypes, ckpt, hp, rope, ids_fp, x_fp, seed, progress, head), ctx)
    del x_fp
    return BlockResult(ckpt, imp, outlier_counts, stats_all, resumed, dataset, head)


#: the tensors outside the blocks that a ``finish_model`` stage sees as stored (:func:`_head_tensors`)
HEAD_TENSORS = ("token_embd.weight", "output.weight")


def _head_tensors(ckpt: Checkpoint, choices: dict, qtypes: dict, source, method: Method, ctx: QuantContext,
                  specs: dict, importance: dict) -> dict[str, np.ndarray]:
    """The bytes of the token embedding and output matrix exactly as the writer would make them (the output
    matrix with the importance of the quantized model's final hidden states), made before a ``finish_model``
    stage so that the stage tunes the blocks against the model as it will be stored; kept in the checkpoint
    (``head.npz``, which a resumed run reuses) and written by the pipeline as they are."""
    if ckpt.has("head"):
        return ckpt.load("head")[0]
    head = {}
    saved, ctx.importance = ctx.importance, dict(importance)
    try:
        for n in HEAD_TENSORS:
            c = choices.get(n)
            if c is not None:
                raw = _tensor_bytes(c, qtypes[c.type], source, method, ctx, specs[n].src_type)
                head[n] = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    finally:
        ctx.importance = saved
    ckpt.save("head", head, {}, {})
    return head


def _deq(qt, data: np.ndarray, shape) -> torch.Tensor:
    return torch.from_numpy(np.array(qt.dequantize(np.asarray(data).view(np.uint8), tuple(shape)),
                                     dtype=np.float32).reshape(shape))


def stored_weight(qt, data: np.ndarray, shape, outliers: tuple | None = None) -> torch.Tensor:
    """The float32 tensor a checkpointed tensor stands for: ``data`` (bytes of ``qt``) dequantized, plus its
    sparse outliers ``(flat positions, values)`` when it has them."""
    w = _deq(qt, data, shape)
    if outliers is not None:
        idx, vals = outliers
        w.view(-1).index_add_(0, torch.from_numpy(np.asarray(idx, np.int64)),
                              torch.from_numpy(np.asarray(vals, np.float32)))
    return w


def _block_seed(seed: int, index: int) -> int:
    return (int(seed) * 1_000_003 + 7919 * (index + 1)) % (2 ** 63)


def _calibration(source, md, names, calib, nsamples, seqlen, seed, progress, threads):
    from .calib import calibration_sequences
    if calib is None or str(calib) == "self":
        from ..runtime.model import LlamaModel
        model = LlamaModel.from_tensors(md, lambda n: source.load(n) if n in names else None, source.path,
                                        threads)
        try:
            return calibration_sequences("self", model, None, md, nsamples, seqlen, seed, progress)
        finally:
            del model
    from ..runtime.tokenizer import Tokenizer
    tok = Tokenizer.from_metadata(md)
    return calibration_sequences(calib, None, tok, md, nsamples, seqlen, seed, progress)


__all__ = ["Block", "BlockMethod", "GramAdapter", "BlockResult", "ModelRun", "Checkpoint", "as_block_method", "run_blocks",
           "sequential_quantize", "relative_error", "chunk_samples", "short_key", "stored_weight", "CHUNK_TOKENS", "RESUME_SUFFIX",
           "resume_folder"]
