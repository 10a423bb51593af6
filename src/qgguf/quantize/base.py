"""The quantization-method interface.

Data flows one way: load -> calibrate -> quantize tensor -> pack -> write. A method sees it in two
calls:

* ``prepare(source, plan, ctx)``: once, before any tensor is written (calibration: run the model over
  calibration text and store what it needs in ``ctx`` - importance vectors, Gram matrices, ...);
* ``quantize_tensor(name, w, qtype, ctx) -> uint8 (rows, row_bytes)``: one tensor at a time, in the
  output order; ``w`` is float32 ``(rows, row length)`` and ``qtype`` a :class:`qgguf.gguf_types.QuantType`
  (a standard ggml type, or a qgguf codebook type stored in a standard container type).

New methods (GPTQ, AutoRound, QuantEase, AQ/VQ codebooks, mixed precision) are one module in this
package with a subclass of :class:`Method`, listed in :data:`METHODS` (or added with :func:`register`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from importlib import import_module
from typing import Any

import numpy as np

from ..errors import OptionError


@dataclass
class QuantContext:
    """What a method may use and leave for later tensors. ``importance``: llama.cpp's importance-matrix
    vectors by weight name (mean of x^2 of the linear's inputs); ``grams``: X^T X by weight name (for
    error-feedback methods); ``extra``: anything else a method wants to keep (codebooks, ...)."""
    source: Any = None
    importance: dict[str, np.ndarray] | None = None
    grams: dict[str, np.ndarray] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    threads: int | None = None
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)   # MetaValue by key, written to the output

    def importance_for(self, name: str, ncols: int) -> np.ndarray | None:
        if not self.importance:
            return None
        v = self.importance.get(name)
        if v is None or v.shape[-1] != ncols:
            return None
        return v


class Method:
    """Base class: subclasses set ``name`` and override ``quantize_tensor`` (and ``prepare`` if they calibrate)."""

    name = "base"
    #: the method calibrates (needs a forward pass over text) unless given precomputed statistics
    needs_calibration = False
    #: tensors already stored in the target type are copied byte for byte (as llama-quantize does)
    copy_same_type = True
    #: the method quantizes block by block (:class:`qgguf.quantize.blockwise.BlockMethod`)
    blockwise = False
    #: the method reads ``ctx.grams[name]`` in ``quantize_tensor``: run it block by block with
    #: true-sequential Gram matrices (:class:`qgguf.quantize.blockwise.GramAdapter`)
    needs_grams = False

    def prepare(self, source, plan, ctx: QuantContext) -> None:
        pass

    def quantize_tensor(self, name: str, w: np.ndarray, qtype, ctx: QuantContext) -> np.ndarray:
        raise NotImplementedError

    def describe(self) -> str:
        return self.name


# name -> "module:Class" (relative to this package); loaded on first use so that the plain RTN path
# imports no torch.
METHODS: dict[str, Any] = {
    "rtn": "rtn:RTN",
    "imatrix": "imatrix:IMatrix",
    "gptq": "gptq:GPTQ",
    "quantease": "quantease:QuantEase",
    "autoround": "autoround:AutoRound",
    "aq": "aq:AQ",
    "vq": "vq:VQ",
}

#: per-tensor methods that need Gram matrices (run block by block), also when they do not set ``needs_grams``
GRAM_METHODS = {"gptq", "quantease"}


def is_blockwise(m: "Method") -> bool:
    """The method runs in the block-by-block calibration pipeline (:mod:`.blockwise`)."""
    return bool(getattr(m, "blockwise", False) or getattr(m, "needs_grams", False) or m.name in GRAM_METHODS)


def register(name: str, target) -> None:
    """Add a method: ``target`` is ``"module:Class"`` (relative to this package, or absolute ``qgguf...``)
    or the class itself."""
    METHODS[name] = target


def method_names() -> list[str]:
    return list(METHODS)


def get_method(name: str, **kwargs) -> Method:
    target = METHODS.get(name)
    if target is None:
        raise OptionError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    if isinstance(target, type):
        return target(**kwargs)
    mod, _, cls = target.partition(":")
    try:
        m = import_module(f"{__package__}.{mod}" if not mod.startswith(("qgguf", ".")) else mod, __package__)
    except ModuleNotFoundError as e:
        if e.name and e.name.endswith(mod):
            raise OptionError(f"method {name!r} is not available in this qgguf (module {mod} is missing)") from None
        raise
    return getattr(m, cls)(**kwargs)


def quantize_with(method: "Method", name: str, w: np.ndarray, qt, ctx: "QuantContext"):
    """``method.quantize_tensor``, except for a row-tiered type (gguf_types/tiers.py), whose tiers take their
    types' importance-weighted rounding in the order of ``ctx.extra["row_weights"][name]`` (by row without)."""
    from ..gguf_types.tiers import is_tiered
    if is_tiered(qt):
        return qt.quantize(w, ctx.importance_for(name, w.shape[-1]),
                           row_weights=(ctx.extra.get("row_weights") or {}).get(name))
    return method.quantize_tensor(name, w, qt, ctx)
