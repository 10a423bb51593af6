"""Row-tiered tensors: one matrix whose rows are stored in several standard types (qgguf's ``tiers`` family).

Made for the token embedding / output matrix. The KL divergence of a model weighs an output row by how likely its
token is (to second order, ``KL ~ 1/2 sum_v p_v (e_v - mean_p e)^2`` for logit errors ``e``), and a token's row
is read as an embedding about as often as the token occurs: the rows of the few thousand likeliest tokens carry
most of the matrix's error. A row-tiered matrix stores those rows in a larger type and the rest in a smaller one.

Type names: ``tiers-T0@N0-T1@N1-...-Tk``: ``N0`` rows in standard type ``T0``, ``N1`` in ``T1``, ..., the rest in
``Tk``; e.g. ``tiers-Q8_0@4096-IQ4_NL``. Which rows is data: the quantizer ranks them by the mean probability of
their tokens on the calibration text (``row_weights``; without it, by row index, i.e. token id, which in BPE
vocabularies roughly follows frequency). A weight ``NAME`` of ``R`` rows and ``C`` columns is (docs/FORMAT.md,
"Row-tiered tensors")::

    NAME.tier_rows  I32 [N0+...+N(k-1)]  the rows of tiers 0..k-1, each tier's ascending; tier k: the others, ascending
    NAME.tier0      T0  GGUF [C, N0]     those rows in that order, a standard ggml tensor
    ...
    NAME.tierk      Tk  GGUF [C, R - N0 - ... - N(k-1)]
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from ..errors import QggufError
from .base import Fields
from .codebook import I32, CodebookType, Companions, CompanionSpec

TIER_ROWS = ".tier_rows"
_RX = re.compile(r"^tiers((?:-[A-Za-z0-9_]+@\d+)+)-([A-Za-z0-9_]+)$", re.IGNORECASE)
MAX_TIERS = 8


def tier_suffix(i: int) -> str:
    return f".tier{i}"


@dataclass(frozen=True)
class TieredType(CodebookType):
    tiers: tuple = ()          # ((standard type, rows), ..., (standard type, 0 = the rest))

    # --- shapes ----------------------------------------------------------------------------------
    def tier_rows(self, R: int) -> list[int]:
        fixed = [n for _, n in self.tiers[:-1]]
        if sum(fixed) >= R:
            raise QggufError(f"{self.name}: a matrix of {R} rows is too small for tiers of {sum(fixed)} rows "
                             "and a last one")
        return fixed + [R - sum(fixed)]

    def companion_specs(self, shape) -> list[CompanionSpec]:
        R, C = self._rc(shape)
        specs = [CompanionSpec(TIER_ROWS, I32, (R - self.tier_rows(R)[-1],), np.dtype("<i4"))]
        for i, ((qt, _), n) in enumerate(zip(self.tiers, self.tier_rows(R))):
            qt.check_row_length(C)
            specs.append(CompanionSpec(tier_suffix(i), qt.ggml_type, (n, C), np.dtype(np.uint8), qt))
        return specs

    def suffixes(self) -> tuple[str, ...]:
        return (TIER_ROWS,) + tuple(tier_suffix(i) for i in range(len(self.tiers)))

    def row_bytes(self, n: int) -> int:
        """Bytes of a row in the largest tier (the sizes per tier: :meth:`nbytes`)."""
        return max(qt.row_bytes(n) for qt, _ in self.tiers)

    def shape_of(self, data: Mapping) -> tuple[int, int]:
        if not isinstance(data, Mapping) or any(x not in data for x in self.suffixes()):
            raise QggufError(f"{self.name}: companions {', '.join(self.suffixes())} are needed")
        R = sum(int(np.asarray(data[tier_suffix(i)]).shape[0]) for i in range(len(self.tiers)))
        last, qt = np.asarray(data[tier_suffix(len(self.tiers) - 1)]), self.tiers[-1][0]
        return R, int(last.shape[-1]) // qt.type_size * qt.block_size

    def metadata(self, name: str, shape) -> dict[str, Any]:
        from gguf import GGUFValueType as V

        from .codebook import META_PREFIX, _meta
        md = super().metadata(name, shape)
        p = f"{META_PREFIX}{name}."
        md[p + "tiers.types"] = _meta([qt.name for qt, _ in self.tiers], V.ARRAY, V.STRING)
        md[p + "tiers.rows"] = _meta(self.tier_rows(self._rc(shape)[0]), V.ARRAY, V.UINT64)
        return md

    # --- data --------------------------------------------------------------------------------------
    def quantize(self, x: np.ndarray, importance: np.ndarray | None = None,
                 row_weights: np.ndarray | None = None) -> Companions:
        """Rows ``x`` (R, C) -> :class:`Companions`. The rows with the largest ``row_weights`` go to the first
        tier, and so on (ties by index; without weights, by index). Each tier is quantized by its type's
        (importance-weighted) rounding."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        R, C = x.shape
        if row_weights is None:
            order = np.arange(R)
        else:
            w = np.asarray(row_weights, np.float64).reshape(-1)
            if w.shape != (R,):
                raise QggufError(f"{self.name}: {w.size} row weights for {R} rows")
            order = np.argsort(-w, kind="stable")
        counts = self.tier_rows(R)
        listed = order[:R - counts[-1]].copy()
        s = 0
        for n in counts[:-1]:   # the stored order: ascending within each tier
            listed[s:s + n] = np.sort(listed[s:s + n])
            s += n
        out = Companions()
        out[TIER_ROWS] = listed.astype(np.int32)
        for i, rows in enumerate(self.rows_of(listed, R)):
            qt = self.tiers[i][0]
            out[tier_suffix(i)] = np.ascontiguousarray(qt.quantize(x[rows], importance)).view(np.uint8).reshape(len(rows), -1)
        return out

    def rows_of(self, tier_rows: np.ndarray, R: int) -> list[np.ndarray]:
        """Each tier's rows (intp, in stored order) from the ``tier_rows`` companion, after checking it: entries in
        0..R-1, ascending within each tier, no row twice (QggufError: corrupt data)."""
        counts = self.tier_rows(R)
        t = np.asarray(tier_rows).astype(np.intp).reshape(-1)
        if t.size != R - counts[-1]:
            raise QggufError(f"{self.name}: corrupt data: {t.size} listed rows, expected {R - counts[-1]}")
        if t.size and (int(t.min()) < 0 or int(t.max()) >= R):
            raise QggufError(f"{self.name}: corrupt data: tier rows outside 0..{R - 1}")
        out, s = [], 0
        for n in counts[:-1]:
            seg = t[s:s + n]
            if n > 1 and not (np.diff(seg) > 0).all():
                raise QggufError(f"{self.name}: corrupt data: the rows of tier {len(out)} are not ascending")
            out.append(seg)
            s += n
        free = np.ones(R, bool)
        free[t] = False
        rest = np.flatnonzero(free)
        if rest.size != counts[-1]:
            raise QggufError(f"{self.name}: corrupt data: a row is listed in two tiers")
        out.append(rest)
        return out

    def _pack_fields(self, fields: Fields) -> Companions:
        out = Companions()
        out[TIER_ROWS] = np.ascontiguousarray(fields["tier_rows"], dtype="<i4")
        for i in range(len(self.tiers)):
            out[tier_suffix(i)] = np.ascontiguousarray(fields[f"tier{i}"]).view(np.uint8)
        return out

    def _unpack_arrays(self, comp: Companions) -> Fields:
        f = {"tier_rows": comp[TIER_ROWS]}
        for i in range(len(self.tiers)):
            f[f"tier{i}"] = comp[tier_suffix(i)]
        return f

    def tier_values(self, fields: Fields) -> list[np.ndarray]:
        """Each tier's rows dequantized, float32 (n_i, C), in stored order."""
        out = []
        for i, (qt, _) in enumerate(self.tiers):
            b = np.asarray(fields[f"tier{i}"]).view(np.uint8)
            n = b.shape[0] if b.ndim == 2 else 0
            C = b.shape[-1] // qt.type_size * qt.block_size
            out.append(np.asarray(qt.dequantize(b, (n, C)), np.float32).reshape(n, C))
        return out

    def dequantize_fields(self, fields: Fields) -> np.ndarray:
        vals = self.tier_values(fields)
        R = sum(v.shape[0] for v in vals)
        w = np.empty((R, vals[-1].shape[1]), np.float32)
        for rows, v in zip(self.rows_of(fields["tier_rows"], R), vals):
            w[rows] = v
        return w


def parse_tiers(name: str) -> TieredType | None:
    """``tiers-T0@N0-...-Tk`` -> :class:`TieredType`; None if ``name`` is not of that form; QggufError if it is
    but a tier type is not a standard quantized type or a count is not positive."""
    m = _RX.match(name.strip())
    if not m:
        return None
    from . import get
    parts = [p.split("@") for p in m.group(1)[1:].split("-")] + [[m.group(2), "0"]]
    if len(parts) > MAX_TIERS:
        raise QggufError(f"{name}: at most {MAX_TIERS} tiers")
    tiers = []
    for t, n in parts:
        qt = get(t)
        if not getattr(qt, "standard", False) or isinstance(qt, CodebookType) or qt.ggml_type is None:
            raise QggufError(f"{name}: tier type {t} is not a standard ggml type")
        if qt.is_float and qt.name not in ("F16", "BF16", "F32"):
            raise QggufError(f"{name}: tier type {t} is not supported")
        tiers.append((qt, int(n)))
    if any(n <= 0 for _, n in tiers[:-1]):
        raise QggufError(f"{name}: every tier but the last needs a positive row count")
    canon = "tiers-" + "-".join(f"{qt.name}@{n}" for qt, n in tiers[:-1]) + "-" + tiers[-1][0].name
    return TieredType(name=canon, ggml_type=None, block_size=max(qt.block_size for qt, _ in tiers),
                      type_size=max(qt.type_size for qt, _ in tiers), family="tiers",
                      description="rows in " + ", ".join(qt.name for qt, _ in tiers) + " by the likelihood of their tokens",
                      standard=False, tiers=tuple(tiers))


def is_tiered(qt) -> bool:
    return isinstance(qt, TieredType)


TYPES: list = []
PARSERS = [parse_tiers]

__all__ = ["TieredType", "parse_tiers", "is_tiered", "TIER_ROWS", "tier_suffix"]
