"""Registry of tensor types (the standard ggml types and qgguf's own), looked up by name or ggml id."""
from __future__ import annotations

from importlib import import_module

from ..errors import QggufError
from .base import Fields, QuantType

_BY_GGML: dict[int, QuantType] = {}
# family parsers: name -> QuantType or None (e.g. codebook.parse_aq for any "aq-MxB-gG")
_PARSERS: list = []
_PARSED: dict[str, QuantType] = {}


def _parse(key: str) -> QuantType | None:
    qt = _PARSED.get(key)
    if qt is None:
        for fn in _PARSERS:
            try:
                qt = fn(key)
            except QggufError:
                qt = None
            if qt is not None:
                _PARSED[key] = qt
                break
    return qt


class _NameTable(dict):
    """Types by upper-case name; names of a registered family (``aq-3x8-g16``) are found by its parser."""

    def __contains__(self, key) -> bool:
        return dict.__contains__(self, key) or (isinstance(key, str) and _parse(key) is not None)

    def __missing__(self, key):
        qt = _parse(key) if isinstance(key, str) else None
        if qt is None:
            raise KeyError(key)
        return qt


_BY_NAME: dict[str, QuantType] = _NameTable()


def register(qt: QuantType) -> QuantType:
    key = qt.name.upper()
    if key in _BY_NAME:
        raise ValueError(f"type {qt.name} registered twice")
    _BY_NAME[key] = qt
    if qt.ggml_type is not None:
        _BY_GGML[qt.ggml_type] = qt
    return qt


def register_parser(fn) -> None:
    """Add a family parser ``fn(name) -> QuantType | None`` (raising QggufError for a malformed member)."""
    _PARSERS.append(fn)


def get(name: str) -> QuantType:
    """The type called ``name`` (case-insensitive), e.g. ``get("q4_k")``, ``get("aq-2x8-g8")``."""
    try:
        return _BY_NAME[name.upper()]
    except KeyError:
        pass
    for fn in _PARSERS:   # a family member with bad parameters: the parser's own message
        if fn(name) is not None:
            break
    raise QggufError(f"unknown tensor type {name!r}; known: {', '.join(names())}, aq-MxB-gG, "
                     "vq-vV-kK[-KR][-oP][-gG], tiers-T0@N0-...-Tk") from None


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
for _mod in ("floats", "legacy", "kquants", "codebook", "vq", "tiers"):
    _m = import_module(f"{__name__}.{_mod}")
    for _qt in _m.TYPES:
        register(_qt)
    for _fn in getattr(_m, "PARSERS", ()):
        register_parser(_fn)

from .codebook import CodebookType, is_codebook  # noqa: E402

__all__ = ["QuantType", "Fields", "CodebookType", "is_codebook", "register", "register_parser", "get", "by_ggml",
           "names", "all_types"]
