"""runtime/threads.py: MKL's dynamic threading, which torch.set_num_threads turns off, is turned back on for the
long torch loops (the end-to-end stage), so MKL called inside torch's parallel regions does not start nested
OpenMP teams."""
from __future__ import annotations

import ctypes
from pathlib import Path

import pytest
import torch

from qgguf.runtime.threads import serial_blas_in_parallel_regions


LIB = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"


@pytest.mark.skipif(not torch.backends.mkl.is_available() or not LIB.is_file(), reason="no MKL (or not Linux)")
def test_mkl_dynamic_is_turned_back_on():
    get = ctypes.CDLL(str(LIB)).mkl_serv_get_dynamic
    get.restype = ctypes.c_int
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(n)
        assert get() == 0                  # what torch leaves
        assert serial_blas_in_parallel_regions() is True
        assert get() == 1
        x = torch.randn(64, 4096)
        torch.testing.assert_close(x.exp().log(), x, rtol=1e-5, atol=1e-5)   # MKL still works after the switch
    finally:
        torch.set_num_threads(n)           # torch's own state again for the other tests


def test_the_end_to_end_stage_sets_it(monkeypatch):
    from qgguf.quantize import finetune
    from qgguf.runtime import threads
    calls = []
    monkeypatch.setattr(threads, "serial_blas_in_parallel_regions", lambda: calls.append(1) or True)
    with pytest.raises(Exception):
        finetune.finetune_model(None, None, None, None, None)   # fails on the missing parts after the call
    assert calls == [1]
