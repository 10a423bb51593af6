"""``--method rtn``: each type's own reference rounding (llama.cpp's quantize_row_*_ref), no calibration."""
from __future__ import annotations

import numpy as np

from .base import Method, QuantContext


class RTN(Method):
    name = "rtn"

    def __init__(self, **_):
        pass

    def quantize_tensor(self, name: str, w: np.ndarray, qtype, ctx: QuantContext) -> np.ndarray:
        return qtype.quantize(w)
