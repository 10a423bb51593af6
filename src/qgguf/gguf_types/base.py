"""The tensor-type interface: one object per type, like ggml's type-traits table.

Conventions (the same as ggml's): a tensor of GGUF shape ``[ne0, ne1, ...]`` is a numpy array of shape
``(..., ne1, ne0)``; it is stored row by row, each row of ``ne0`` values cut into blocks of ``block_size``
values, each block ``type_size`` bytes. Quantized data is handled as ``uint8`` arrays of shape
``(rows, row_bytes)``.

A type does three jobs:

* ``quantize(x, importance)``: floats -> bytes, with the type's own choice of codes and scales
  (llama.cpp's reference rounding without ``importance``; llama.cpp's importance-weighted search with it).
* ``pack(fields)`` / ``unpack(data)``: integer codes and scales chosen by *any* method -> bytes, and back.
  This is how calibrated methods (GPTQ, AutoRound, ...) reuse the layouts.
* ``dequantize(data)``: bytes -> float32.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np

from ..errors import QggufError

Fields = dict[str, np.ndarray]


@dataclass(frozen=True)
class QuantType:
    name: str                      # e.g. "Q4_K"
    ggml_type: int | None          # gguf.GGMLQuantizationType value; None for qgguf's own types
    block_size: int                # weights per block
    type_size: int                 # bytes per block
    # Row functions. All take/return 2-D arrays: rows x (row_len) floats, rows x (row_bytes) uint8.
    _quantize: Callable[[np.ndarray, np.ndarray | None], np.ndarray] = field(repr=False, default=None)
    _dequantize: Callable[[np.ndarray], np.ndarray] = field(repr=False, default=None)
    _pack: Callable[[Fields], np.ndarray] | None = field(repr=False, default=None)
    _unpack: Callable[[np.ndarray], Fields] | None = field(repr=False, default=None)
    _values: Callable[[Fields], np.ndarray] | None = field(repr=False, default=None)
    description: str = ""
    is_float: bool = False         # F32/F16/BF16: no quantization error beyond rounding to the float format
    standard: bool = True          # loadable by stock llama.cpp

    # --- sizes ---------------------------------------------------------------------------------
    @property
    def bpw(self) -> float:
        return 8.0 * self.type_size / self.block_size

    def row_bytes(self, n: int) -> int:
        self.check_row_length(n)
        return n // self.block_size * self.type_size

    def nbytes(self, shape: tuple[int, ...]) -> int:
        rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        return rows * self.row_bytes(int(shape[-1]))

    def fits(self, n: int) -> bool:
        return n % self.block_size == 0

    def check_row_length(self, n: int) -> None:
        if n % self.block_size:
            raise QggufError(f"rows of {n} values do not divide into {self.name} blocks of {self.block_size}")

    # --- conversions ---------------------------------------------------------------------------
    def quantize(self, x: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
        """Float rows (..., n) -> uint8 (rows, row_bytes). ``importance``: per-column weights, length n."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        n = x.shape[-1]
        self.check_row_length(n)
        x2 = x.reshape(-1, n)
        if importance is not None:
            importance = np.ascontiguousarray(importance, dtype=np.float32).reshape(-1)
            if importance.shape[0] != n:
                raise QggufError(f"importance has {importance.shape[0]} values for rows of {n}")
        out = self._quantize(x2, importance)
        assert out.dtype == np.uint8 and out.shape == (x2.shape[0], self.row_bytes(n)), (self.name, out.shape)
        return out

    def dequantize(self, data: np.ndarray, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """uint8 (rows, row_bytes) (or flat) -> float32 of ``shape`` (default: rows x n)."""
        data = np.ascontiguousarray(data).view(np.uint8)
        if shape is not None:
            n = int(shape[-1])
            data = data.reshape(-1, self.row_bytes(n))
        elif data.ndim == 1:
            data = data.reshape(1, -1)
        if data.shape[-1] % self.type_size:
            raise QggufError(f"{self.name} data of {data.shape[-1]} bytes per row is not whole blocks")
        out = self._dequantize(data)
        return out.reshape(shape) if shape is not None else out

    def pack(self, fields: Mapping[str, np.ndarray]) -> np.ndarray:
        if self._pack is None:
            raise QggufError(f"{self.name} has no pack()")
        return self._pack(dict(fields))

    def values(self, fields: Mapping[str, np.ndarray]) -> np.ndarray:
        """The float value of every weight that ``fields`` (as from :meth:`unpack`) encode: the type's grid."""
        if self._values is None:
            raise QggufError(f"{self.name} has no values()")
        return self._values(dict(fields))

    def unpack(self, data: np.ndarray) -> Fields:
        if self._unpack is None:
            raise QggufError(f"{self.name} has no unpack()")
        return self._unpack(np.ascontiguousarray(data).view(np.uint8).reshape(data.shape[0], -1))
