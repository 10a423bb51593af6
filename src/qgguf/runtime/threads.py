"""torch's thread count, and no nested OpenMP teams under it.

Why the second part: numba's OpenMP threading layer (``numba.set_num_threads``, any ``prange``) sets the calling
thread's ``max-active-levels`` to the runtime's maximum, i.e. allows nested parallel regions. When numba has loaded
the system ``libgomp.so.1`` before torch is imported, torch binds to that same runtime, and then every MKL call
made inside one of torch's own ``parallel_for`` regions (``sgemm`` in CPU flash attention, ``vmsExp`` under
``exp``; torch's ``set_num_threads`` turns MKL's dynamic adjustment off) starts a nested team, for which libgomp
creates new threads each time. In whole mixed SmolLM2 conversions that made the end-to-end stage about 3x slower
(more than 2,000 thread creations per second, 62 % of the samples in libgomp). ``tools/omp_nesting_probe.py``
reproduces it in a few seconds; docs/BENCHMARKS.md (session 10) has the figures."""
from __future__ import annotations

import ctypes
import sys
from contextlib import contextmanager

_RUNTIMES = ("libgomp", "libiomp", "libomp")
_handles: dict[str, object] = {}


def _loaded_openmp_runtimes() -> list[str]:
    """Paths of the OpenMP runtimes mapped into this process (Linux: /proc/self/maps; elsewhere none found)."""
    if not sys.platform.startswith("linux"):
        return []
    paths = set()
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                p = line.rsplit(None, 1)[-1] if "/" in line else ""
                if any(r in p.rsplit("/", 1)[-1] for r in _RUNTIMES):
                    paths.add(p)
    except OSError:
        return []
    return sorted(paths)


def no_nested_openmp() -> int:
    """``omp_set_max_active_levels(1)`` for the calling thread in every OpenMP runtime loaded in the process, so
    a parallel region inside another runs on one thread (module docstring). torch's worker threads take the
    setting from the thread that starts each of its parallel regions. Returns how many runtimes were set."""
    n = 0
    for p in _loaded_openmp_runtimes():
        fn = _handles.get(p)
        if fn is None:
            try:
                fn = ctypes.CDLL(p).omp_set_max_active_levels
            except (OSError, AttributeError):
                fn = False
            else:
                fn.argtypes = [ctypes.c_int]
            _handles[p] = fn
        if fn:
            fn(1)
            n += 1
    return n


def set_torch_threads(n: int) -> None:
    """``torch.set_num_threads(n)`` (at least 1), then :func:`no_nested_openmp`."""
    import torch
    torch.set_num_threads(max(1, int(n)))
    no_nested_openmp()


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


__all__ = ["no_nested_openmp", "set_torch_threads", "torch_threads"]
