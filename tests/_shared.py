"""Helpers shared by several test modules (imported by name: pytest puts tests/ on sys.path)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
KQ = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


@pytest.fixture
def one_torch_thread():
    """Small matrices: one torch thread is faster (and steadier on a shared machine)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def correlated_layer(rows: int, n: int, seed: int = 0, tokens: int = 512, outliers: bool = False):
    """A weight and the Gram matrix of correlated inputs with uneven column scales."""
    rng = np.random.default_rng(seed)
    k = max(4, n // 4)
    X = rng.standard_normal((tokens, k)) @ rng.standard_normal((k, n)) + 0.5 * rng.standard_normal((tokens, n))
    X *= np.exp(0.5 * rng.standard_normal(n))
    W = (0.05 * rng.standard_normal((rows, n))).astype(np.float32)
    if outliers:
        W[rng.random(W.shape) < 0.01] *= 8
    return W, X.T @ X


def ncols(name: str) -> int:
    """A row length every grid type divides (K-quants need 256)."""
    return 512 if name in KQ else 128


def synthetic_tool():
    """tools/synthetic_model.py as a module."""
    spec = importlib.util.spec_from_file_location("synthetic_model", ROOT / "tools" / "synthetic_model.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["synthetic_model"] = mod
    spec.loader.exec_module(mod)
    return mod


def aq_tol(n: int = 1, B: int = 8) -> float:
    """Relative-error bound of a native AQ product of n tokens on the current ISA path: 8-bit tables (AVX-512
    decoding, ~7e-3) or finer (16-bit tables ~5e-5, float tables ~1e-6); see qgguf.native.table_bits."""
    from qgguf import native
    return 1.5e-2 if native.table_bits(n, B) == 8 else 2e-4


def rewrite_gguf(src, dst, mutate=None, *, dequantize: bool = False, drop_keys=()):
    """Copy a GGUF through gguf.GGUFWriter with ``mutate(name, array) -> array`` applied to tensors (None: the
    tensor is left out); ``dequantize``: every tensor as F32 (before ``mutate``); ``drop_keys``: metadata not
    copied."""
    import gguf
    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), "llama")
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture" or k in drop_keys:
            continue
        vt = f.types[0]
        sub = f.types[-1] if vt == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(k, f.contents(), vt, sub_type=sub)
    for t in r.tensors:
        tt = gguf.GGMLQuantizationType(int(t.tensor_type))
        if dequantize:
            a0, tt = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32), gguf.GGMLQuantizationType.F32
        else:
            a0 = np.array(t.data)
        a = mutate(t.name, a0) if mutate is not None else a0
        if a is None:
            continue
        if a.dtype != a0.dtype:
            tt = {np.dtype(np.int16): gguf.GGMLQuantizationType.I16, np.dtype(np.int8): gguf.GGMLQuantizationType.I8,
                  np.dtype(np.float32): gguf.GGMLQuantizationType.F32}[a.dtype]
        w.add_tensor(t.name, a, raw_dtype=tt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
