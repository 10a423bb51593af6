"""A float32 torch forward pass equal to llama.cpp's ``llama`` graph (src/llama-model.cpp, llm_build_llama).

Per layer: ``x += Wo·attn(rope(Wq·n), rope(Wk·n), Wv·n)`` with ``n = rmsnorm(x)·attn_norm``, then
``x += Wdown·(silu(Wgate·m) * Wup·m)`` with ``m = rmsnorm(x)·ffn_norm``; finally
``logits = Woutput·(rmsnorm(x)·output_norm)`` where ``Woutput`` is ``token_embd.weight`` when the file has
no ``output.weight`` (tied embeddings).

Rope is ggml's NORM mode (LLAMA_ROPE_TYPE_NORM): it rotates *adjacent* pairs ``(x[2i], x[2i+1])`` of the
first ``n_rot`` values of each head, which is how GGUF stores q/k (convert_hf_to_gguf permutes HF's
half-split layout into it). Attention is causal softmax with scale ``1/sqrt(head_dim)`` and grouped-query
heads (query head ``h`` reads kv head ``h // (n_head / n_head_kv)``).

Weights go through :func:`qgguf.runtime.linear.make_linear`, so other linear kinds (codebook types with
native kernels) plug in without touching this file.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputFileError, QggufError, UnsupportedModelError
from .actquant import round_f16
from .linear import LinearBase, dequantize_tensor, make_linear
from .threads import set_torch_threads

CaptureCallback = Callable[[str, torch.Tensor], None]


@dataclass
class LlamaHParams:
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    head_dim_k: int
    head_dim_v: int
    n_rot: int
    rope_freq_base: float = 10000.0
    rope_freq_scale: float = 1.0
    norm_eps: float = 1e-5
    n_ctx_train: int = 4096

    @property
    def n_embd_k_gqa(self) -> int:
        return self.head_dim_k * self.n_head_kv

    @property
    def n_embd_v_gqa(self) -> int:
        return self.head_dim_v * self.n_head_kv


# ------------------------------------------------------------------------------------------------
# GGUF reading helpers


def _field_value(field):
    try:
        return field.contents()
    except Exception:  # pragma: no cover - malformed field
        return None


def read_metadata(reader) -> dict:
    """All key/value fields of a ``gguf.GGUFReader`` as plain Python values."""
    return {k: _field_value(f) for k, f in reader.fields.items()}


def _scalar(md: dict, key: str, default=None, *, path=None, required=False):
    v = md.get(key)
    if v is None:
        if required:
            raise UnsupportedModelError(f"missing metadata key {key}", path)
        return default
    if isinstance(v, (list, tuple)):  # per-layer arrays (llama.cpp allows them for some keys)
        vals = set(v)
        if len(vals) != 1:
            raise UnsupportedModelError(f"{key} differs between layers ({sorted(vals)}); not supported", path)
        v = v[0]
    return v


def hparams_from_metadata(md: dict, n_vocab: int, path=None) -> LlamaHParams:
    try:
        return _hparams(md, n_vocab, path)
    except (TypeError, ValueError, OverflowError, ZeroDivisionError) as e:   # a number of the wrong kind
        raise UnsupportedModelError(f"invalid hyper-parameter in the metadata: {e}", path) from None


def _positive(md: dict, key: str, v, path, limit: int = 1 << 24) -> int:
    if isinstance(v, (str, bytes, bool)) or not 0 < int(v) <= limit or int(v) != v:
        raise UnsupportedModelError(f"metadata {key} = {v!r} is not a positive integer up to {limit}", path)
    return int(v)


def _hparams(md: dict, n_vocab: int, path=None) -> LlamaHParams:
    arch = md.get("general.architecture")
    if arch != "llama":
        raise UnsupportedModelError(f"architecture {arch!r} is not supported (only 'llama')", path)
    a = "llama"
    if int(_scalar(md, f"{a}.expert_count", 0, path=path) or 0) > 0:
        raise UnsupportedModelError("mixture-of-experts llama models are not supported", path)
    def pos(key, default=None, required=False, limit=1 << 24):
        k = f"{a}.{key}"
        return _positive(md, k, _scalar(md, k, default, path=path, required=required), path, limit)
    n_embd = pos("embedding_length", required=True)
    n_layer = pos("block_count", required=True, limit=4096)
    n_head = pos("attention.head_count", required=True, limit=4096)
    n_ff = pos("feed_forward_length", required=True)
    n_head_kv = pos("attention.head_count_kv", n_head, limit=4096)
    if n_head <= 0 or n_head_kv <= 0 or n_head % n_head_kv:
        raise UnsupportedModelError(f"{n_head} attention heads do not share {n_head_kv} kv heads evenly", path)
    hd_k = pos("attention.key_length", max(1, n_embd // n_head))
    hd_v = pos("attention.value_length", max(1, n_embd // n_head))
    n_rot = int(_scalar(md, f"{a}.rope.dimension_count", hd_k, path=path))
    if n_rot <= 0 or n_rot % 2 or n_rot > hd_k:
        raise UnsupportedModelError(f"rope dimension count {n_rot} does not fit heads of {hd_k}", path)
    base = float(_scalar(md, f"{a}.rope.freq_base", 10000.0, path=path))
    scaling = _scalar(md, f"{a}.rope.scaling.type", "none", path=path) or "none"
    factor = _scalar(md, f"{a}.rope.scaling.factor", None, path=path)
    if factor is None:
        factor = _scalar(md, f"{a}.rope.scale_linear", None, path=path)
    if scaling not in ("none", "linear"):
        raise UnsupportedModelError(f"rope scaling {scaling!r} is not supported (none, linear)", path)
    # as llama.cpp: freq_scale = 1/factor whenever a factor is given
    freq_scale = 1.0 / float(factor) if factor is not None and float(factor) > 0 else 1.0
    eps = float(_scalar(md, f"{a}.attention.layer_norm_rms_epsilon", 1e-5, path=path))
    n_ctx = pos("context_length", 4096, limit=1 << 30)
    if not (math.isfinite(base) and base > 0 and math.isfinite(eps) and eps >= 0
            and math.isfinite(freq_scale) and freq_scale > 0):
        raise UnsupportedModelError(f"invalid rope base {base}, rope scale {freq_scale} or norm epsilon {eps}", path)
    return LlamaHParams(n_vocab=n_vocab, n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_head_kv=n_head_kv,
                        n_ff=n_ff, head_dim_k=hd_k, head_dim_v=hd_v, n_rot=n_rot, rope_freq_base=base,
                        rope_freq_scale=freq_scale, norm_eps=eps, n_ctx_train=n_ctx)


class _TensorSource:
    """Raw tensors of a GGUF file by name, with shape checks."""

    def __init__(self, reader, path):
        self.path = path
        self.tensors = {t.name: t for t in reader.tensors}

    def has(self, name: str) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        t = self.tensors[name]
        return tuple(int(s) for s in reversed([int(x) for x in t.shape]))  # numpy order

    def get(self, name: str, expect: tuple[int, ...] | None, *, optional=False):
        t = self.tensors.get(name)
        if t is None:
            if optional:
                return None
            raise UnsupportedModelError(f"missing tensor {name}", self.path)
        shape = self.shape(name)
        # GGUF drops trailing 1s; compare without them
        if expect is not None and tuple(shape) != tuple(expect):
            if not (len(expect) == 1 and shape == (1,) * (len(shape) - 1) + (expect[0],)):
                raise UnsupportedModelError(f"tensor {name} has shape {tuple(shape)}, expected {tuple(expect)}",
                                            self.path)
        raw = np.asarray(t.data)
        raw = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
        return int(t.tensor_type), shape, raw

    def linear(self, name: str, expect: tuple[int, int], optional=False) -> LinearBase | None:
        got = self.get(name, expect, optional=optional)
        if got is None:
            return None
        tt, shape, raw = got
        try:
            lin = make_linear(name, tt, shape, raw)
        except UnsupportedModelError as e:
            if e.path is None:
                raise UnsupportedModelError(e.problem, self.path) from None
            raise
        sparse = self.outliers(name)
        if sparse is not None:
            lin = add_sparse(lin, *sparse)
        return lin

    def outliers(self, name: str) -> tuple[np.ndarray, np.ndarray] | None:
        """The qgguf sparse-outlier part of ``name`` (flat int indices, float32 values), or None."""
        ti, tv = self.tensors.get(name + OUTLIER_IDX), self.tensors.get(name + OUTLIER_VAL)
        if ti is None and tv is None:
            return None
        if ti is None or tv is None or int(ti.tensor_type) != 26 or int(tv.tensor_type) != 1:
            raise UnsupportedModelError(f"tensor {name}: sparse outliers need {name}{OUTLIER_IDX} (I32) and "
                                        f"{name}{OUTLIER_VAL} (F16)", self.path)
        idx = np.asarray(ti.data).view(np.int32).reshape(-1)
        val = np.asarray(tv.data).view(np.float16).reshape(-1)
        if idx.shape != val.shape:
            raise UnsupportedModelError(f"tensor {name}: {idx.size} outlier indices but {val.size} values", self.path)
        return idx.astype(np.int64), val.astype(np.float32)

    def vector(self, name: str, n: int, optional=False) -> torch.Tensor | None:
        got = self.get(name, (n,), optional=optional)
        if got is None:
            return None
        tt, shape, raw = got
        try:
            v = dequantize_tensor(name, tt, (1, n), raw)
        except UnsupportedModelError as e:
            raise UnsupportedModelError(e.problem, self.path) from None
        return torch.from_numpy(np.ascontiguousarray(v.reshape(n), dtype=np.float32))


# ------------------------------------------------------------------------------------------------
# The network


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


# ------------------------------------------------------------------------------------------------
# qgguf sparse outliers (docs/FORMAT.md, "qgguf extensions: sparse outliers")

OUTLIER_IDX = ".outlier_idx"   # companion tensor: I32 flat indices row * ncols + col, increasing
OUTLIER_VAL = ".outlier_val"   # companion tensor: F16 values added to the dense weight at those positions


class SparseAddedLinear(LinearBase):
    """A compressed linear (AQ, VQ: kept in its own kind) plus a sparse float part: ``y = lin(x) + x S^T``, ``S``
    held as its (row, column, value) triples, so the weight stays compressed in memory."""

    kind = "sparse-added"

    def __init__(self, lin: LinearBase, idx: np.ndarray, vals: np.ndarray):
        super().__init__(lin.name, lin.out_features, lin.in_features)
        self.inner = lin
        rows, cols = np.divmod(np.asarray(idx, np.int64).reshape(-1), lin.in_features)
        self.rows, self.cols = torch.from_numpy(rows), torch.from_numpy(cols)
        self.vals = torch.from_numpy(np.asarray(vals, np.float32).reshape(-1).copy())
        self.count = int(rows.size)

    def _coo(self) -> torch.Tensor:
        return torch.sparse_coo_tensor(torch.stack((self.rows, self.cols)), self.vals,
                                       (self.out_features, self.in_features), check_invariants=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        flat = x.reshape(-1, self.in_features).to(torch.float32)
        if flat.shape[0] <= 16:     # decode: a gather and an index_add (9 us against the sparse product's 41 us
            extra = torch.zeros(flat.shape[0], self.out_features)      # for 1769 outliers, one token, 1 thread)
            extra.index_add_(1, self.rows, flat[:, self.cols] * self.vals)
        else:
            extra = torch.sparse.mm(self._coo(), flat.t()).t()
        return y + extra.reshape(y.shape)

    def dense_weight(self) -> torch.Tensor:
        return self.inner.dense_weight().to(torch.float32) + self._coo().to_dense()

    def extra_repr(self) -> str:
        return f"{self.inner.extra_repr()} + {self.count} sparse outliers"


def add_sparse(lin: LinearBase, idx: np.ndarray, vals: np.ndarray) -> LinearBase:
    """``lin`` with the sparse part added: a :class:`DenseLinear` holding ``dense + scatter(idx, vals)`` for a
    dense weight, else a :class:`SparseAddedLinear` (the compressed kind kept as it is)."""
    from .linear import DenseLinear

    n = lin.out_features * lin.in_features
    idx = np.asarray(idx, dtype=np.int64).reshape(-1)
    if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise UnsupportedModelError(f"tensor {lin.name}: outlier index out of range 0..{n - 1}")
    if not isinstance(lin, DenseLinear):
        return SparseAddedLinear(lin, idx, vals)
    w = lin.dense_weight().detach().to(torch.float32).clone()
    w.view(-1).index_add_(0, torch.from_numpy(idx), torch.from_numpy(np.asarray(vals, dtype=np.float32).reshape(-1)))
    return DenseLinear(lin.name, w, source_type=f"{getattr(lin, 'source_type', lin.kind)}+outliers")


# ------------------------------------------------------------------------------------------------
# Functional forward pieces (calibration, block-wise quantization). ``w`` maps the short keys of one
# block ('attn_norm', 'attn_q', ..., 'ffn_down', optional 'attn_q.bias', ...) to float32 tensors in
# numpy orientation (out, in); activations are (B, T, n_embd).

BLOCK_LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
BLOCK_NORMS = ("attn_norm", "ffn_norm")


def rope_tables(hp: LlamaHParams, n_pos: int, rope_freqs: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables ``(n_pos, n_rot/2)`` float32, computed as ggml_rope_cache_init does."""
    half = hp.n_rot // 2
    # as ggml_rope_cache_init: theta = pos; theta *= theta_scale per pair, in float32
    theta_scale = np.float32(hp.rope_freq_base ** (-2.0 / hp.n_rot))
    theta = np.arange(n_pos, dtype=np.float32)
    thetas = np.empty((n_pos, half), dtype=np.float32)
    for i in range(half):
        thetas[:, i] = theta
        theta = (theta * theta_scale).astype(np.float32)
    if rope_freqs is not None:
        thetas = thetas / np.asarray(rope_freqs, dtype=np.float32).reshape(-1)
    thetas = (thetas * np.float32(hp.rope_freq_scale)).astype(np.float32)
    t = torch.from_numpy(thetas)
    return torch.cos(t), torch.sin(t)


_ROPE_CACHE: dict = {}


def _rope_for(hp: LlamaHParams, T: int, rope) -> tuple[torch.Tensor, torch.Tensor]:
    if rope is not None:
        cos, sin = rope
        return cos[:T], sin[:T]
    key = (hp.n_rot, hp.rope_freq_base, hp.rope_freq_scale)
    got = _ROPE_CACHE.get(key)
    if got is None or got[0].shape[0] < T:
        got = rope_tables(hp, max(T, 256))
        _ROPE_CACHE.clear()
        _ROPE_CACHE[key] = got
    return got[0][:T], got[1][:T]


def rope_apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_rot: int) -> torch.Tensor:
    """ggml NORM rope of ``x`` (..., T, heads, head_dim) with tables (T, n_rot/2)."""
    xr = x[..., :n_rot].reshape(*x.shape[:-1], n_rot // 2, 2)
    x0, x1 = xr[..., 0], xr[..., 1]
    c, s = cos[:, None, :], sin[:, None, :]
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).reshape(*x.shape[:-1], n_rot)
    if n_rot == x.shape[-1]:
        return out
    return torch.cat((out, x[..., n_rot:]), dim=-1)


def linear(w: dict, key: str, x: torch.Tensor) -> torch.Tensor:
    """``x @ w[key].T + w[key + '.bias']`` (bias when present)."""
    return F.linear(x, w[key], w.get(key + ".bias"))


def attention(hp: LlamaHParams, w: dict, n: torch.Tensor, rope=None) -> torch.Tensor:
    """Causal self-attention of the normed input ``n`` (B, T, n_embd) at positions 0..T-1, before the
    output matrix: returns (B, T, n_head * head_dim_v)."""
    B, T, _ = n.shape
    H, Hkv, dk, dv = hp.n_head, hp.n_head_kv, hp.head_dim_k, hp.head_dim_v
    cos, sin = _rope_for(hp, T, rope)
    q = rope_apply(linear(w, "attn_q", n).view(B, T, H, dk), cos, sin, hp.n_rot)
    k = rope_apply(linear(w, "attn_k", n).view(B, T, Hkv, dk), cos, sin, hp.n_rot)
    v = linear(w, "attn_v", n).view(B, T, Hkv, dv)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if H != Hkv:   # explicit repeat: the same kernels forward and backward
        k = k.repeat_interleave(H // Hkv, dim=1)
        v = v.repeat_interleave(H // Hkv, dim=1)
    a = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, scale=1.0 / math.sqrt(dk))
    return a.transpose(1, 2).reshape(B, T, H * dv)


def ffn_hidden(w: dict, m: torch.Tensor) -> torch.Tensor:
    """``silu(gate(m)) * up(m)`` of the normed input ``m``."""
    return F.silu(linear(w, "ffn_gate", m)) * linear(w, "ffn_up", m)


def block_forward(hp: LlamaHParams, w: dict, x: torch.Tensor, rope=None) -> torch.Tensor:
    """One transformer block of ``x`` (B, T, n_embd) float32 at positions 0..T-1 (the math of
    :class:`LlamaModel`'s layers; differentiable). ``rope``: optional (cos, sin) from :func:`rope_tables`
    (needed when the model has ``rope_freqs``)."""
    eps = hp.norm_eps
    x = x + linear(w, "attn_output", attention(hp, w, rms_norm(x, w["attn_norm"], eps), rope))
    return x + linear(w, "ffn_down", ffn_hidden(w, rms_norm(x, w["ffn_norm"], eps)))


def embed(w_tok: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Token embeddings (rows of ``token_embd.weight``) as float32."""
    return F.embedding(torch.as_tensor(ids, dtype=torch.long), w_tok).to(torch.float32)


def final_norm(hp: LlamaHParams, w_norm: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return rms_norm(x, w_norm, hp.norm_eps)


def lm_head(w_out: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Logits of normed hidden states ``h``."""
    return F.linear(h, w_out)


class _ArraySource:
    """Tensors from a function ``name -> float32 numpy array or None`` (the :class:`_TensorSource` interface)."""

    def __init__(self, tensor_fn: Callable[[str], np.ndarray | None], path=None):
        self.fn = tensor_fn
        self.path = path

    def _get(self, name: str, expect, optional: bool) -> np.ndarray | None:
        a = self.fn(name)
        if a is None:
            if optional:
                return None
            raise UnsupportedModelError(f"missing tensor {name}", self.path)
        a = np.require(a, np.float32, ["C", "W"])   # copies read-only (memory-mapped) arrays
        if expect is not None and int(np.prod(a.shape)) != int(np.prod(expect)):
            raise UnsupportedModelError(f"tensor {name} has shape {a.shape}, expected {tuple(expect)}", self.path)
        return a.reshape(expect) if expect is not None else a

    def has(self, name: str) -> bool:
        return self.fn(name) is not None

    def linear(self, name: str, expect, optional=False):
        from .linear import DenseLinear
        a = self._get(name, expect, optional)
        return None if a is None else DenseLinear(name, torch.from_numpy(a))

    def vector(self, name: str, n: int, optional=False):
        a = self._get(name, (n,), optional)
        return None if a is None else torch.from_numpy(a)


class _Layer(torch.nn.Module):
    def __init__(self, il: int, src: _TensorSource, hp: LlamaHParams):
        super().__init__()
        p = f"blk.{il}."
        self.prefix = p
        E, H, Hkv, dk, dv, ff = hp.n_embd, hp.n_head, hp.n_head_kv, hp.head_dim_k, hp.head_dim_v, hp.n_ff
        self.attn_norm = src.vector(p + "attn_norm.weight", E)
        self.ffn_norm = src.vector(p + "ffn_norm.weight", E)
        self.wq = src.linear(p + "attn_q.weight", (H * dk, E))
        self.wk = src.linear(p + "attn_k.weight", (Hkv * dk, E))
        self.wv = src.linear(p + "attn_v.weight", (Hkv * dv, E))
        self.wo = src.linear(p + "attn_output.weight", (E, H * dv))
        self.w_gate = src.linear(p + "ffn_gate.weight", (ff, E))
        self.w_up = src.linear(p + "ffn_up.weight", (ff, E))
        self.w_down = src.linear(p + "ffn_down.weight", (E, ff))
        # optional biases (llm_build_llama adds them when present)
        self.bq = src.vector(p + "attn_q.bias", H * dk, optional=True)
        self.bk = src.vector(p + "attn_k.bias", Hkv * dk, optional=True)
        self.bv = src.vector(p + "attn_v.bias", Hkv * dv, optional=True)
        self.bo = src.vector(p + "attn_output.bias", E, optional=True)
        self.b_gate = src.vector(p + "ffn_gate.bias", ff, optional=True)
        self.b_up = src.vector(p + "ffn_up.bias", ff, optional=True)
        self.b_down = src.vector(p + "ffn_down.bias", E, optional=True)


class KVCache:
    """Per-layer K and V, ``(n_head_kv, capacity, head_dim)`` float32, grown on demand."""

    def __init__(self, hp: LlamaHParams, capacity: int = 256):
        self.hp = hp
        self.capacity = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.n_past = 0
        self._grow(capacity)

    def _grow(self, need: int) -> None:
        if need <= self.capacity:
            return
        cap = max(need, 2 * self.capacity, 64)
        hp = self.hp
        newk = [torch.zeros(hp.n_head_kv, cap, hp.head_dim_k) for _ in range(hp.n_layer)]
        newv = [torch.zeros(hp.n_head_kv, cap, hp.head_dim_v) for _ in range(hp.n_layer)]
        for i in range(len(self.k)):
            newk[i][:, : self.capacity] = self.k[i]
            newv[i][:, : self.capacity] = self.v[i]
        self.k, self.v, self.capacity = newk, newv, cap

    def clear(self) -> None:
        self.n_past = 0


def _attention_f16_cache(q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, mask, scale: float) -> torch.Tensor:
    """Attention as llama.cpp computes it with its default F16 KV cache (no flash attention): K and V hold
    fp16 values, q is rounded to fp16 for the K dot products, softmax(scale * qK^T + mask) in float32, and the
    probabilities are rounded to fp16 for the V products. q (H, T, dk), K (Hkv, n, dk), V (Hkv, n, dv)."""
    H, T, Hkv = q.shape[0], q.shape[1], K.shape[0]
    # query heads grouped by their KV head (head h uses KV head h // (H / Hkv)): broadcasting, no K/V copies
    qg = round_f16(q).reshape(Hkv, H // Hkv, T, q.shape[2])
    s = torch.matmul(qg, K.unsqueeze(1).transpose(2, 3)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.matmul(round_f16(p), V.unsqueeze(1)).reshape(H, T, V.shape[2])


class LlamaModel(torch.nn.Module):
    """A llama-architecture GGUF model. ``forward(tokens, start_pos)`` -> float32 logits ``(T, n_vocab)``."""

    def __init__(self, hp: LlamaHParams, src: _TensorSource, metadata: dict, path: Path | None = None):
        super().__init__()
        self.hp = hp
        self.metadata = metadata
        self.path = path
        # llama.cpp's default KV cache holds fp16; QGGUF_KV_F32=1 keeps it float32 (llama.cpp's -ctk f32 -ctv f32)
        self.kv_f16 = os.environ.get("QGGUF_KV_F32", "") in ("", "0")
        E = hp.n_embd
        self.tok_embd = src.linear("token_embd.weight", (hp.n_vocab, E))
        self.layers = torch.nn.ModuleList([_Layer(il, src, hp) for il in range(hp.n_layer)])
        self.output_norm = src.vector("output_norm.weight", E)
        out = src.linear("output.weight", (hp.n_vocab, E), optional=True)
        self.tied = out is None
        self.output = self.tok_embd if out is None else out
        self.output_name = "token_embd.weight" if out is None else "output.weight"
        self.rope_freqs = src.vector("rope_freqs.weight", hp.n_rot // 2, optional=True)
        self.cache = KVCache(hp)
        self._capture: CaptureCallback | None = None
        self._rope_cos = torch.empty(0)
        self._rope_sin = torch.empty(0)

    # ---- loading --------------------------------------------------------------------------------
    @classmethod
    def from_gguf(cls, path: str | Path, threads: int | None = None) -> "LlamaModel":
        import gguf

        path = Path(path)
        if threads:
            set_torch_threads(int(threads))
        if not path.is_file():
            raise InputFileError("no such model file", path)
        from ..convert.ggufread import GGUFFile
        GGUFFile(path).close()   # strict structure checks first: any malformed file is one InputFileError
        try:
            reader = gguf.GGUFReader(str(path), "r")
        except Exception as e:
            raise InputFileError(f"cannot read as GGUF: {e}", path) from None
        md = read_metadata(reader)
        from .linear import _codebook_source, _drop_mapped_pages, has_codebook_tensors

        codebooks = has_codebook_tensors(md)  # qgguf's AQ/VQ tensors stay compressed (native kernels)
        src = _codebook_source(reader, path, md) if codebooks else _TensorSource(reader, path)
        if not src.has("token_embd.weight"):
            # check the architecture first so that a non-llama file gets the better message
            hparams_from_metadata(md, 0, path)
            raise UnsupportedModelError("missing tensor token_embd.weight", path)
        n_vocab = src.shape("token_embd.weight")[0]
        hp = hparams_from_metadata(md, n_vocab, path)
        try:
            with torch.no_grad():
                model = cls(hp, src, md, path)
        except QggufError as e:   # a decoder's error (corrupt tensor data) names this file
            raise e.at(path) from None
        model.eval()
        if codebooks:
            _drop_mapped_pages(reader)
        return model

    @classmethod
    def from_tensors(cls, metadata: dict, tensor_fn: Callable[[str], np.ndarray | None], path=None,
                     threads: int | None = None) -> "LlamaModel":
        """A model from plain metadata values and ``tensor_fn(name)`` -> float32 numpy array (numpy
        orientation; ``None`` for an absent tensor), e.g. a conversion source's dequantized weights."""
        if threads:
            set_torch_threads(int(threads))
        src = _ArraySource(tensor_fn, path)
        md = dict(metadata)
        emb = tensor_fn("token_embd.weight")
        if emb is None:
            hparams_from_metadata(md, 0, path)
            raise UnsupportedModelError("missing tensor token_embd.weight", path)
        hp = hparams_from_metadata(md, int(np.shape(emb)[0]), path)
        del emb
        with torch.no_grad():
            model = cls(hp, src, md, path)
        model.eval()
        return model

    def block_weights(self, il: int) -> dict[str, torch.Tensor]:
        """Layer ``il``'s weights as float32 tensors under the short keys of :func:`block_forward`."""
        L = self.layers[il]
        w = {"attn_norm": L.attn_norm, "ffn_norm": L.ffn_norm}
        for key, lin, b in (("attn_q", L.wq, L.bq), ("attn_k", L.wk, L.bk), ("attn_v", L.wv, L.bv),
                            ("attn_output", L.wo, L.bo), ("ffn_gate", L.w_gate, L.b_gate),
                            ("ffn_up", L.w_up, L.b_up), ("ffn_down", L.w_down, L.b_down)):
            w[key] = lin.dense_weight()
            if b is not None:
                w[key + ".bias"] = b
        return w

    # ---- calibration hook -----------------------------------------------------------------------
    @contextlib.contextmanager
    def capture_linear_inputs(self, callback: CaptureCallback) -> Iterator["LlamaModel"]:
        """Within the block, ``callback(weight_name, x)`` is called before every matrix multiplication
        with its float32 input ``x`` of shape ``(tokens, in_features)`` (q, k and v share one input;
        the output matrix is named ``output.weight``, or ``token_embd.weight`` when tied, and sees only
        the positions whose logits are computed)."""
        prev = self._capture
        self._capture = callback
        try:
            yield self
        finally:
            self._capture = prev

    def _mm(self, lin: LinearBase, x: torch.Tensor, bias: torch.Tensor | None = None,
            name: str | None = None) -> torch.Tensor:
        if self._capture is not None:
            self._capture(name or lin.name, x.reshape(-1, x.shape[-1]))
        y = lin(x)
        if bias is not None:
            y = y + bias
        return y

    # ---- rope -----------------------------------------------------------------------------------
    def _rope_tables(self, n_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._rope_cos.shape[0] < n_pos:
            cap = max(n_pos, 2 * self._rope_cos.shape[0], 256)
            self._rope_cos, self._rope_sin = rope_tables(self.hp, cap, self.rope_freqs)
        return self._rope_cos, self._rope_sin

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x: (T, heads, head_dim); cos/sin: (T, n_rot/2)
        return rope_apply(x, cos, sin, self.hp.n_rot)

    # ---- forward --------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the KV cache (the next forward must start at position 0)."""
        self.cache.clear()

    @property
    def n_past(self) -> int:
        return self.cache.n_past

    @torch.no_grad()
    def forward(self, tokens: Sequence[int] | torch.Tensor, start_pos: int = 0, logits_from: int = 0) -> torch.Tensor:
        """Run ``tokens`` at positions ``start_pos ..``, reusing the KV cache for earlier positions.

        Returns float32 logits ``(T - logits_from, n_vocab)`` for the batch positions ``[logits_from:]``
        (``logits_from=-1``: the last position only)."""
        hp = self.hp
        ids = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
        T = int(ids.shape[0])
        if T == 0:
            return torch.empty(0, hp.n_vocab)
        if start_pos < 0 or start_pos > self.cache.n_past:
            raise ValueError(f"start_pos {start_pos} is beyond the {self.cache.n_past} cached positions")
        if int(ids.min()) < 0 or int(ids.max()) >= hp.n_vocab:
            raise ValueError(f"token id out of range 0..{hp.n_vocab - 1}")
        end = start_pos + T
        cache = self.cache
        cache._grow(end)
        cos_t, sin_t = self._rope_tables(end)
        cos, sin = cos_t[start_pos:end], sin_t[start_pos:end]
        H, Hkv, dk, dv = hp.n_head, hp.n_head_kv, hp.head_dim_k, hp.head_dim_v
        scale = 1.0 / math.sqrt(dk)
        if T > 1:
            qpos = torch.arange(start_pos, end)[:, None]
            kpos = torch.arange(end)[None, :]
            mask = kpos <= qpos  # (T, end) True = attend
        else:
            mask = None

        x = self.tok_embd.embed(ids).to(torch.float32)
        for il, L in enumerate(self.layers):
            n = rms_norm(x, L.attn_norm, hp.norm_eps)
            q = self._mm(L.wq, n, L.bq).view(T, H, dk)
            k = self._mm(L.wk, n, L.bk).view(T, Hkv, dk)
            v = self._mm(L.wv, n, L.bv).view(T, Hkv, dv)
            q = self._rope(q, cos, sin)
            k = self._rope(k, cos, sin)
            if self.kv_f16:
                k, v = round_f16(k), round_f16(v)
            cache.k[il][:, start_pos:end] = k.transpose(0, 1)
            cache.v[il][:, start_pos:end] = v.transpose(0, 1)
            K = cache.k[il][:, :end]
            V = cache.v[il][:, :end]
            if self.kv_f16:
                a = _attention_f16_cache(q.transpose(0, 1), K, V, mask, scale)
            else:
                a = F.scaled_dot_product_attention(q.transpose(0, 1), K, V, attn_mask=mask, scale=scale,
                                                   enable_gqa=(H != Hkv))  # (H, T, dv)
            a = a.transpose(0, 1).reshape(T, H * dv)
            x = x + self._mm(L.wo, a, L.bo)
            m = rms_norm(x, L.ffn_norm, hp.norm_eps)
            g = self._mm(L.w_gate, m, L.b_gate)
            u = self._mm(L.w_up, m, L.b_up)
            x = x + self._mm(L.w_down, F.silu(g) * u, L.b_down)
        cache.n_past = end
        h = x[logits_from:]
        h = rms_norm(h, self.output_norm, hp.norm_eps)
        return self._mm(self.output, h, name=self.output_name)

    # convenience
    def logits(self, tokens: Sequence[int]) -> torch.Tensor:
        """Logits for every position of ``tokens`` from an empty cache."""
        self.reset()
        return self.forward(tokens, 0)

    @property
    def n_vocab(self) -> int:
        return self.hp.n_vocab

    @property
    def n_ctx_train(self) -> int:
        return self.hp.n_ctx_train


__all__ = ["LlamaModel", "LlamaHParams", "KVCache", "hparams_from_metadata", "read_metadata", "rms_norm",
           "block_forward", "attention", "ffn_hidden", "linear", "embed", "final_norm", "lm_head", "rope_tables",
           "rope_apply", "add_sparse", "SparseAddedLinear", "BLOCK_LINEARS", "BLOCK_NORMS", "OUTLIER_IDX", "OUTLIER_VAL"]
