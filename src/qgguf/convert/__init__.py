"""Conversion: model sources (GGUF, Hugging Face folders, aliases), llama.cpp's presets, the streaming writer.

``qgguf.convert`` is both this package and the API function ``qgguf.convert(src, out, ...)``: importing a
submodule rebinds the package attribute, so the package object itself is made callable and forwards to
:func:`qgguf.api.convert`.
"""
from __future__ import annotations

import sys
import types


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from ..api import convert

        return convert(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
