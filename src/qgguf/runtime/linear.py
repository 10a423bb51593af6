"""Weight matrices of the torch runner ("linear kinds").

A GGUF weight of numpy shape ``(out_features, in_features)`` (GGUF shape ``[in, out]``) becomes a module
whose ``forward(x)`` computes ``x @ W.T`` for ``x`` of shape ``(..., in_features)``, and whose ``embed(ids)``
returns rows of ``W`` (used for ``token_embd.weight``, which is also the output matrix of tied models).

:func:`make_linear` picks the kind for a tensor type:

* a kind registered with :func:`register_linear_kind` for that type (by ggml type id or by type name):
  this is how codebook types (qgguf's AQ/VQ) plug in with their own native kernels, keeping their
  weights compressed in memory;
* otherwise :class:`DenseLinear`: the data is dequantized once, at load, through the tensor-type
  registry :mod:`qgguf.gguf_types`, and kept as float32.
"""
from __future__ import annotations

from typing import Callable, Union

import numpy as np
import torch

from ..errors import UnsupportedModelError

TypeKey = Union[int, str]
# factory(name, tensor_type, shape, raw_data) -> LinearBase
LinearFactory = Callable[[str, int, tuple, np.ndarray], "LinearBase"]

_KINDS: dict[TypeKey, LinearFactory] = {}


class LinearBase(torch.nn.Module):
    """Interface of a weight matrix: ``forward(x)`` = ``x @ W.T``; ``embed(ids)`` = ``W[ids]``."""

    kind = "base"

    def __init__(self, name: str, out_features: int, in_features: int):
        super().__init__()
        self.name = name
        self.out_features = int(out_features)
        self.in_features = int(in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``W[ids]`` as float32 (the token-embedding lookup, ggml's get_rows)."""
        raise UnsupportedModelError(f"tensor {self.name} ({self.kind}) cannot be used as a token embedding")

    def dense_weight(self) -> torch.Tensor:
        """The full weight as float32 ``(out_features, in_features)`` (for tools and tests)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"{self.name}: {self.in_features} -> {self.out_features} ({self.kind})"


class DenseLinear(LinearBase):
    """A float32 weight held in memory (any standard type, dequantized at load)."""

    kind = "dense"

    def __init__(self, name: str, weight: torch.Tensor, source_type: str = "F32"):
        weight = weight.to(torch.float32).contiguous()
        super().__init__(name, weight.shape[0], weight.shape[1])
        self.source_type = source_type
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.embedding(ids, self.weight)

    def dense_weight(self) -> torch.Tensor:
        return self.weight

    def extra_repr(self) -> str:
        return f"{self.name}: {self.in_features} -> {self.out_features} (dense from {self.source_type})"


def register_linear_kind(type_key: TypeKey, factory: LinearFactory, *, replace: bool = False) -> None:
    """Use ``factory(name, tensor_type, shape, raw_data)`` for tensors of ``type_key``
    (a ggml type id, or a type name as in :mod:`qgguf.gguf_types`, case-insensitive)."""
    key = type_key.upper() if isinstance(type_key, str) else int(type_key)
    if key in _KINDS and not replace:
        raise ValueError(f"a linear kind for {type_key!r} is already registered")
    _KINDS[key] = factory


def _type_name(tensor_type: int) -> str | None:
    try:
        import gguf

        return gguf.GGMLQuantizationType(int(tensor_type)).name
    except (ValueError, ImportError):
        return None


def dequantize_tensor(name: str, tensor_type: int, shape: tuple, raw_data: np.ndarray) -> np.ndarray:
    """Float32 array of ``shape`` from a tensor's raw bytes, through the tensor-type registry."""
    from .. import gguf_types
    from ..errors import QggufError

    try:
        qt = gguf_types.by_ggml(int(tensor_type))
    except QggufError:
        tname = _type_name(tensor_type) or f"id {int(tensor_type)}"
        raise UnsupportedModelError(f"tensor {name} has type {tname}, which qgguf cannot load yet") from None
    raw = np.ascontiguousarray(raw_data).view(np.uint8)
    expected = qt.nbytes(tuple(int(s) for s in shape))
    if raw.size != expected:
        raise UnsupportedModelError(
            f"tensor {name}: {raw.size} bytes of {qt.name} data for shape {tuple(shape)} (expected {expected})")
    return qt.dequantize(raw, tuple(int(s) for s in shape))


def make_linear(name: str, tensor_type: int, shape: tuple, raw_data: np.ndarray) -> LinearBase:
    """Module for the weight ``name`` of ggml ``tensor_type``, numpy ``shape`` ``(out, in)`` and raw bytes."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 2:
        raise UnsupportedModelError(f"tensor {name} has shape {shape}; a weight matrix must be 2-D")
    factory = _KINDS.get(int(tensor_type))
    if factory is None:
        tname = _type_name(tensor_type)
        if tname is None:
            try:
                from .. import gguf_types

                tname = gguf_types.by_ggml(int(tensor_type)).name
            except Exception:
                tname = None
        if tname is not None:
            factory = _KINDS.get(tname.upper())
    if factory is not None:
        return factory(name, int(tensor_type), shape, raw_data)
    w = dequantize_tensor(name, tensor_type, shape, raw_data)
    return DenseLinear(name, torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)),
                       source_type=_type_name(tensor_type) or str(tensor_type))


__all__ = ["LinearBase", "DenseLinear", "make_linear", "register_linear_kind", "dequantize_tensor"]
