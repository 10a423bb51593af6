"""qgguf: turn a language model into a small, accurate GGUF file.

    import qgguf
    qgguf.convert("smollm2-135m", "out.gguf", type="Q4_K_M")
    model = qgguf.load("out.gguf")
"""
from __future__ import annotations

from .api import Model, convert, load
from .errors import QggufError

__version__ = "0.1.0"

__all__ = ["QggufError", "Model", "convert", "load", "__version__"]
