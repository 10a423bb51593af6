"""llama.cpp's i-quants with lattice grids (IQ2_XXS ...) are read through gguf-py's dequantizer, so llama.cpp's own
low-bit files can be evaluated beside qgguf's; qgguf does not write them."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import quants

from qgguf.errors import UnsupportedModelError
from qgguf.runtime.linear import READ_ONLY_GGML, dequantize_tensor


@pytest.mark.parametrize("tname", READ_ONLY_GGML)
def test_read_only_types_dequantize_like_gguf_py(tname):
    t = gguf.GGMLQuantizationType[tname]
    block, tsize = gguf.GGML_QUANT_SIZES[t]
    rng = np.random.default_rng(0)
    rows, n = 3, 2 * block
    raw = rng.integers(0, 256, size=(rows, n // block * tsize), dtype=np.uint8)
    # a finite fp16 scale at the start of every block (random bytes may spell inf/nan; IQ1_M keeps its scale
    # elsewhere, and NaN compares equal in assert_array_equal)
    blocks = raw.reshape(rows, n // block, tsize)
    blocks[..., :2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    want = quants.dequantize(raw, t).reshape(rows, n)
    got = dequantize_tensor("w", int(t), (rows, n), raw)
    assert got.dtype == np.float32 and got.shape == (rows, n)
    np.testing.assert_array_equal(got, want)


def test_read_only_type_size_errors_name_the_tensor():
    t = gguf.GGMLQuantizationType.IQ2_XXS
    block, tsize = gguf.GGML_QUANT_SIZES[t]
    with pytest.raises(UnsupportedModelError, match="blk.0.ffn_down.weight.*expected"):
        dequantize_tensor("blk.0.ffn_down.weight", int(t), (2, block), np.zeros(tsize, np.uint8))
    with pytest.raises(UnsupportedModelError, match="do not divide"):
        dequantize_tensor("w", int(t), (2, 100), np.zeros(10, np.uint8))
