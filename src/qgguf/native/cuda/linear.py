"""The runner's linear kind for codebook weights on a GPU: :class:`CudaCodebookLinear`.

The weight stays compressed on the GPU (:mod:`qgguf.native.cuda`); ``forward`` takes inputs on any device and
returns outputs on the input's device, so a model whose other parts run on the CPU can apply its AQ/VQ weights on
the GPU (``QGGUF_CODEBOOK_DEVICE=cuda``, or :func:`qgguf.runtime.linear.set_codebook_device`), and a model moved
to the GPU keeps everything there.
"""
from __future__ import annotations

import sys

import torch

from ...runtime.linear import LinearBase
from . import available, from_companions, unavailable_reason

__all__ = ["CudaCodebookLinear", "cuda_codebook_linear"]


class CudaCodebookLinear(LinearBase):
    """A codebook weight (``aq`` or ``vq``) applied by the CUDA kernels: the fused kernels for a few tokens (8 for AQ
    with up to 2 codebooks, 4 otherwise: :meth:`qgguf.native.cuda.CudaAQTensor.matmul`), fp16 dequantization +
    cuBLAS above."""

    kind = "cuda"

    def __init__(self, name: str, qt, shape: tuple[int, int], comp, device=None):
        R, C = int(shape[0]), int(shape[1])
        super().__init__(name, R, C)
        self.qt = qt
        self.t = from_companions(qt, (R, C), comp, device=device)

    @property
    def nbytes(self) -> int:
        return int(self.t.nbytes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dev = x.device
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] == 1:
            y = self.t.matvec(x2[0]).reshape(1, self.out_features)
        else:
            y = self.t.matmul(x2)
        return y.to(dev).reshape(*lead, self.out_features)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(ids, dtype=torch.long)
        w = self.t.dequantize(torch.float32)
        return w[ids.to(w.device)].to(ids.device)

    def dense_weight(self) -> torch.Tensor:
        return self.t.dequantize(torch.float32).cpu()

    def extra_repr(self) -> str:
        return f"{self.name}: {self.in_features} -> {self.out_features} ({self.qt.name}, cuda {self.t.device})"


_warned: list = []


def cuda_codebook_linear(name: str, qt, shape, comp) -> LinearBase | None:
    """A :class:`CudaCodebookLinear`, or None (after one warning on stderr naming the reason) when the CUDA kernels
    cannot run here: the caller then builds the CPU kind."""
    if not available():
        if not _warned:
            print(f"qgguf: warning: codebook weights stay on the CPU: {unavailable_reason()}", file=sys.stderr)
            _warned.append(True)
        return None
    return CudaCodebookLinear(name, qt, shape, comp)
