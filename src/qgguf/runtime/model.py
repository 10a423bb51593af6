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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputFileError, UnsupportedModelError
from .linear import LinearBase, dequantize_tensor, make_linear

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
    arch = md.get("general.architecture")
    if arch != "llama":
        raise UnsupportedModelError(f"architecture {arch!r} is not supported (only 'llama')", path)
    a = "llama"
    if int(_scalar(md, f"{a}.expert_count", 0, path=path) or 0) > 0:
        raise UnsupportedModelError("mixture-of-experts llama models are not supported", path)
    n_embd = int(_scalar(md, f"{a}.embedding_length", path=path, required=True))
    n_layer = int(_scalar(md, f"{a}.block_count", path=path, required=True))
    n_head = int(_scalar(md, f"{a}.attention.head_count", path=path, required=True))
    n_ff = int(_scalar(md, f"{a}.feed_forward_length", path=path, required=True))
    n_head_kv = int(_scalar(md, f"{a}.attention.head_count_kv", n_head, path=path))
    if n_head <= 0 or n_head_kv <= 0 or n_head % n_head_kv:
        raise UnsupportedModelError(f"{n_head} attention heads do not share {n_head_kv} kv heads evenly", path)
    hd_k = int(_scalar(md, f"{a}.attention.key_length", n_embd // n_head, path=path))
    hd_v = int(_scalar(md, f"{a}.attention.value_length", n_embd // n_head, path=path))
    n_rot = int(_scalar(md, f"{a}.rope.dimension_count", hd_k, path=path))
    if n_rot % 2 or n_rot > hd_k:
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
    n_ctx = int(_scalar(md, f"{a}.context_length", 4096, path=path))
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
            return make_linear(name, tt, shape, raw)
        except UnsupportedModelError as e:
            if e.path is None:
                raise UnsupportedModelError(e.problem, self.path) from None
            raise

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


class LlamaModel(torch.nn.Module):
    """A llama-architecture GGUF model. ``forward(tokens, start_pos)`` -> float32 logits ``(T, n_vocab)``."""

    def __init__(self, hp: LlamaHParams, src: _TensorSource, metadata: dict, path: Path | None = None):
        super().__init__()
        self.hp = hp
        self.metadata = metadata
        self.path = path
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
            torch.set_num_threads(int(threads))
        if not path.is_file():
            raise InputFileError("no such model file", path)
        try:
            reader = gguf.GGUFReader(str(path), "r")
        except Exception as e:
            raise InputFileError(f"cannot read as GGUF: {e}", path) from None
        md = read_metadata(reader)
        src = _TensorSource(reader, path)
        if not src.has("token_embd.weight"):
            # check the architecture first so that a non-llama file gets the better message
            hparams_from_metadata(md, 0, path)
            raise UnsupportedModelError("missing tensor token_embd.weight", path)
        n_vocab = src.shape("token_embd.weight")[0]
        hp = hparams_from_metadata(md, n_vocab, path)
        with torch.no_grad():
            model = cls(hp, src, md, path)
        model.eval()
        return model

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
            hp = self.hp
            cap = max(n_pos, 2 * self._rope_cos.shape[0], 256)
            half = hp.n_rot // 2
            # as ggml_rope_cache_init: theta = pos; theta *= theta_scale per pair, in float32
            theta_scale = np.float32(hp.rope_freq_base ** (-2.0 / hp.n_rot))
            theta = np.arange(cap, dtype=np.float32)
            thetas = np.empty((cap, half), dtype=np.float32)
            for i in range(half):
                thetas[:, i] = theta
                theta = (theta * theta_scale).astype(np.float32)
            if self.rope_freqs is not None:
                thetas = thetas / self.rope_freqs.numpy().astype(np.float32)
            thetas = (thetas * np.float32(hp.rope_freq_scale)).astype(np.float32)
            t = torch.from_numpy(thetas)
            self._rope_cos, self._rope_sin = torch.cos(t), torch.sin(t)
        return self._rope_cos, self._rope_sin

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x: (T, heads, head_dim); cos/sin: (T, n_rot/2)
        n_rot = self.hp.n_rot
        xr = x[..., :n_rot].reshape(*x.shape[:-1], n_rot // 2, 2)
        x0, x1 = xr[..., 0], xr[..., 1]
        c, s = cos[:, None, :], sin[:, None, :]
        out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).reshape(*x.shape[:-1], n_rot)
        if n_rot == x.shape[-1]:
            return out
        return torch.cat((out, x[..., n_rot:]), dim=-1)

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
            cache.k[il][:, start_pos:end] = k.transpose(0, 1)
            cache.v[il][:, start_pos:end] = v.transpose(0, 1)
            K = cache.k[il][:, :end]
            V = cache.v[il][:, :end]
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


__all__ = ["LlamaModel", "LlamaHParams", "KVCache", "hparams_from_metadata", "read_metadata", "rms_norm"]
