"""Reference quantization by llama.cpp's own ggml (the shared library shipped in llama-cpp-python).

``ggml_quantize(type_name, x, imatrix=None)`` calls ``ggml_quantize_chunk`` through ctypes and returns
the bytes as ``np.uint8`` of shape ``(rows, row_bytes)``. Tests that use it must first do
``pytest.importorskip("llama_cpp")`` (``lib()`` raises ImportError when the package is missing).
"""
from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType
from gguf.constants import GGML_QUANT_SIZES


@functools.lru_cache(maxsize=None)
def lib() -> ctypes.CDLL:
    import llama_cpp  # noqa: F401  (ImportError when missing)

    libdir = Path(llama_cpp.__file__).resolve().parent / "lib"
    cands = sorted(libdir.glob("libggml-base.so*")) + sorted(libdir.glob("libggml-base*.dylib")) \
        + sorted(libdir.glob("ggml-base*.dll"))
    if not cands:
        raise ImportError(f"no libggml-base in {libdir}: {os.listdir(libdir)}")
    mode = getattr(os, "RTLD_GLOBAL", 0)
    g = ctypes.CDLL(str(cands[0]), mode=mode)
    g.ggml_quantize_chunk.restype = ctypes.c_size_t
    g.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                      ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    g.ggml_quantize_init.restype = None
    g.ggml_quantize_init.argtypes = [ctypes.c_int]
    g.ggml_row_size.restype = ctypes.c_size_t
    g.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    return g


def ggml_quantize(type_name: str, x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Quantize float rows ``x`` (..., n) with ggml; ``imatrix``: per-column importance (length n)."""
    g = lib()
    t = GGMLQuantizationType[type_name.upper()]
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    rows = x2.shape[0]
    block, tsize = GGML_QUANT_SIZES[t]
    assert n % block == 0, (type_name, n)
    row_bytes = n // block * tsize
    assert g.ggml_row_size(int(t), n) == row_bytes
    out = np.zeros((rows, row_bytes), dtype=np.uint8)
    imp_ptr = None
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32).reshape(-1)
        assert imatrix.shape[0] == n
        imp_ptr = imatrix.ctypes.data
    g.ggml_quantize_init(int(t))
    written = g.ggml_quantize_chunk(int(t), x2.ctypes.data, out.ctypes.data, 0, rows, n, imp_ptr)
    assert written == rows * row_bytes, (written, rows * row_bytes)
    return out
