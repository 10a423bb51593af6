"""Registry of tensor types (the standard ggml types and qgguf's own), looked up by name or ggml id."""
from __future__ import annotations

from importlib import import_module

from ..errors import QggufError
from .base import Fields, QuantType

_BY_NAME: dict[str, QuantType] = {}
_BY_GGML: dict[int, QuantType] = {}


def register(qt: QuantType) -> QuantType:
    key = qt.name.upper()
    if key in _BY_NAME:
        raise ValueError(f"type {qt.name} registered twice")
    _BY_NAME[key] = qt
    if qt.ggml_type is not None:
        _BY_GGML[qt.ggml_type] = qt
    return qt


def get(name: str) -> QuantType:
    """The type called ``name`` (case-insensitive), e.g. ``get("q4_k")``."""
    try:
        return _BY_NAME[name.upper()]
    except KeyError:
        raise QggufError(f"unknown tensor type {name!r}; known: {', '.join(names())}") from None


def by_ggml(type_id: int) -> QuantType:
    try:
        return _BY_GGML[int(type_id)]
    except KeyError:
        raise QggufError(f"tensor type id {int(type_id)} is not supported by qgguf") from None


def names() -> list[str]:
    return [qt.name for qt in _BY_NAME.values()]


def all_types() -> list[QuantType]:
    return list(_BY_NAME.values())


# Each module lists its types in TYPES; the order here is the order of `names()`.
for _mod in ("floats", "legacy", "kquants"):
    for _qt in import_module(f"{__name__}.{_mod}").TYPES:
        register(_qt)

__all__ = ["QuantType", "Fields", "register", "get", "by_ggml", "names", "all_types"]
