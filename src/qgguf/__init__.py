"""qgguf: turn a language model into a small, accurate GGUF file."""
from __future__ import annotations

from .errors import QggufError

__version__ = "0.1.0"

__all__ = ["QggufError", "__version__"]
