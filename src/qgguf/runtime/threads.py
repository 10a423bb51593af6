"""Threading settings of torch's bundled BLAS that qgguf's long torch loops need."""
from __future__ import annotations

import ctypes
from pathlib import Path


def serial_blas_in_parallel_regions() -> bool:
    """Let MKL run serially when it is called inside one of torch's own OpenMP parallel regions.

    ``torch.set_num_threads`` turns MKL's dynamic thread adjustment off (``mkl_set_dynamic(0)``). MKL called from
    inside a torch parallel region (the per-head matrix products of CPU ``scaled_dot_product_attention``, ``exp``
    over a chunk of logits) may then start a nested OpenMP team, and libgomp creates new threads for every nested
    team. In whole SmolLM2 AQ conversions this happened in the end-to-end stage (more than 2,000 threads created
    per second; py-spy: 60 % of the samples in libgomp) and made the stage about 2.5x slower than the same stage
    in a fresh process, where it does not nest. ``MKL_Set_Dynamic(1)`` lets MKL pick one thread inside a parallel
    region; torch's own parallelism is unchanged. Call it after the last ``torch.set_num_threads`` before the loop
    (that call turns it off again). Returns whether MKL was found."""
    import torch
    if not torch.backends.mkl.is_available():
        return False
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib", "torch_cpu.dll"):
        p = Path(torch.__file__).parent / "lib" / name
        if p.is_file():
            try:
                fn = ctypes.CDLL(str(p)).MKL_Set_Dynamic   # C interface (int); mkl_set_dynamic is Fortran's (int *)
            except (OSError, AttributeError):
                return False
            fn.argtypes = [ctypes.c_int]
            fn(1)
            return True
    return False





def set_torch_threads(n: int) -> None:
    """``torch.set_num_threads(n)``, then MKL's dynamic threading back on (:func:`serial_blas_in_parallel_regions`),
    which that call turns off."""
    import torch
    torch.set_num_threads(max(1, int(n)))
    serial_blas_in_parallel_regions()


__all__ = ["serial_blas_in_parallel_regions", "set_torch_threads"]
