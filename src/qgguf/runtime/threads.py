"""torch's thread count, and the threading setting of its bundled MKL that goes with it."""
from __future__ import annotations

import ctypes
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=1)
def _mkl_set_dynamic():
    """MKL's ``MKL_Set_Dynamic`` in torch's library (None without MKL), looked up once: it is called at every
    thread setting, per quantized linear in the block methods."""
    import torch
    if not torch.backends.mkl.is_available():
        return None
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib", "torch_cpu.dll"):
        p = Path(torch.__file__).parent / "lib" / name
        if p.is_file():
            try:
                fn = ctypes.CDLL(str(p)).MKL_Set_Dynamic   # C interface (int); mkl_set_dynamic is Fortran's (int *)
            except (OSError, AttributeError):
                return None
            fn.argtypes = [ctypes.c_int]
            return fn
    return None


def serial_blas_in_parallel_regions() -> bool:
    """Turn MKL's dynamic thread adjustment back on, which ``torch.set_num_threads`` turns off
    (``mkl_set_dynamic(0)``), so that MKL called inside one of torch's own OpenMP parallel regions may run on one
    thread instead of starting a nested team.

    Why: in whole mixed SmolLM2 AQ conversions the end-to-end stage created more than 2,000 threads per second
    (py-spy: 62 % of the samples in libgomp). gdb showed MKL (``vmsExp`` under ``exp``, ``sgemm`` under CPU flash
    attention) starting nested OpenMP teams inside torch's ``parallel_for``; libgomp creates new threads for every
    nested team. A fresh process with the same settings does not nest; the trigger was not found. With this
    setting the worker threads' nested teams stopped but the main thread's under flash attention did not, and the
    stage was not measurably faster (docs/BENCHMARKS.md, session 9). Returns whether MKL was found."""
    fn = _mkl_set_dynamic()
    if fn is None:
        return False
    fn(1)
    return True


def set_torch_threads(n: int) -> None:
    """``torch.set_num_threads(n)`` (at least 1), then :func:`serial_blas_in_parallel_regions`, which that call
    undoes."""
    import torch
    torch.set_num_threads(max(1, int(n)))
    serial_blas_in_parallel_regions()


@contextmanager
def torch_threads(n: int | None):
    """Run torch with ``n`` intra-op threads inside the block (None or 0: leave as is), the old count after."""
    if not n:
        yield
        return
    import torch
    old = torch.get_num_threads()
    set_torch_threads(n)
    try:
        yield
    finally:
        set_torch_threads(old)


__all__ = ["serial_blas_in_parallel_regions", "set_torch_threads", "torch_threads"]
