"""llama.cpp's activation rounding, so the runner's arithmetic agrees with llama.cpp's CPU backend.

llama.cpp multiplies a quantized weight by an activation vector that it first converts to the weight type's
``vec_dot_type``: Q8_0 blocks of 32 (fp16 scale) for Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/IQ4_NL, Q8_K blocks of 256
(float scale) for the K-quants, fp16 for F16 and bf16 for BF16 weights; F32 weights see F32 activations.
The integer block dot products are exact, so rounding the activation the same way and then multiplying by the
dequantized weight in float32 reproduces llama.cpp's result up to float summation order.

Set ``QGGUF_EXACT_ACTIVATIONS=1`` to turn this off (float32 activations everywhere).
"""
from __future__ import annotations

import os
from typing import Callable

import torch

Rounder = Callable[[torch.Tensor], torch.Tensor]


def round_q8_0(x: torch.Tensor) -> torch.Tensor:
    """Q8_0 round trip as ggml-cpu's quantize_row_q8_0: d = amax/127 stored as fp16, q = round(x*127/amax)
    (ties to even, as the SIMD path), value = fp16(d) * q."""
    xb = x.reshape(*x.shape[:-1], -1, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    d = (amax / 127.0).to(torch.float16).to(torch.float32)
    inv = torch.where(amax > 0, 127.0 / amax.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(amax))
    q = torch.round(xb * inv)
    return (q * d).reshape(x.shape)


def round_q8_k(x: torch.Tensor) -> torch.Tensor:
    """Q8_K round trip as ggml's quantize_row_q8_K: the signed value of largest magnitude ``mx`` (first one),
    iscale = -127/mx, q = min(127, nearest(iscale*x)), value = q / iscale (float32 scale)."""
    xb = x.reshape(*x.shape[:-1], -1, 256)
    idx = xb.abs().argmax(-1, keepdim=True)
    mx = xb.gather(-1, idx)
    nz = mx != 0
    iscale = torch.where(nz, -127.0 / torch.where(nz, mx, torch.ones_like(mx)), torch.zeros_like(mx))
    q = torch.round(iscale * xb).clamp_max(127.0)
    d = torch.where(nz, 1.0 / torch.where(nz, iscale, torch.ones_like(iscale)), torch.zeros_like(iscale))
    return (q * d).reshape(x.shape)


def round_f16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).to(torch.float32)


def round_bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).to(torch.float32)


_BY_TYPE: dict[str, Rounder] = {
    **{t: round_q8_0 for t in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL")},
    **{t: round_q8_k for t in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")},
    "F16": round_f16,
    "BF16": round_bf16,
}


def rounder_for(type_name: str | None) -> Rounder | None:
    """The activation rounding llama.cpp applies before a matmul with weights of ``type_name`` (None: none)."""
    if type_name is None or os.environ.get("QGGUF_EXACT_ACTIVATIONS", "") not in ("", "0"):
        return None
    return _BY_TYPE.get(type_name.upper())
