"""F32, F16 and BF16: unquantized storage types."""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T

from .base import QuantType


def _bf16_from_f32(x: np.ndarray) -> np.ndarray:
    # Round to nearest even, as ggml's ggml_compute_fp32_to_bf16 (NaN kept quiet).
    u = x.view(np.uint32).astype(np.uint64)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    r = ((u + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)
    r = np.where(nan, ((u >> 16) | 64).astype(np.uint16), r)
    return r


def _make(name: str, gt: T, np_dtype, to_store, from_store) -> QuantType:
    size = np.dtype(np_dtype).itemsize
    return QuantType(
        name=name, ggml_type=int(gt), block_size=1, type_size=size, is_float=True,
        _quantize=lambda x, imp: np.ascontiguousarray(to_store(x)).view(np.uint8).reshape(x.shape[0], -1),
        _dequantize=lambda d: from_store(np.ascontiguousarray(d).view(np_dtype)).astype(np.float32),
        description=f"{name}, {8 * size} bits, unquantized",
    )


F32 = _make("F32", T.F32, np.float32, lambda x: x.astype(np.float32), lambda a: a)
F16 = _make("F16", T.F16, np.float16, lambda x: x.astype(np.float16), lambda a: a)
BF16 = _make("BF16", T.BF16, np.uint16, _bf16_from_f32,
             lambda a: (a.astype(np.uint32) << 16).view(np.float32))

TYPES = [F32, F16, BF16]
