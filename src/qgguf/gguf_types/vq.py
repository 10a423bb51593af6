"""VQ: qgguf's vector-quantization codebook type (VPTQ-style; Liu et al., "VPTQ: Extreme Low-bit Vector
Post-Training Quantization for Large Language Models").

A weight ``W`` (R output rows x C input columns, numpy orientation) is stored column by column in a permuted
column order ``perm`` (``perm[p]`` = the original column at position ``p``). Each column is cut into
``R / v`` vectors of ``v`` consecutive rows; vector ``b`` of position ``p`` is a centroid index into a
codebook of ``k`` entries of ``v`` values, plus (optionally) a residual index into a second codebook of
``kr`` entries. The first ``n_out`` positions (the outlier columns: the most salient inputs) use their own
outlier codebook (``k`` entries, no residual); the other ``C - n_out`` positions are split into ``G``
codebook groups of ``ceil((C - n_out) / G)`` consecutive positions, each with its own main and residual
codebook. Every position has a column scale and bias (float16)::

    W[b*v + i, perm[p]] = (book(p)[idx[b, p]][i] + rbook(p)[ridx[b, p]][i]) * colscale[p] + colbias[p]

computed in float32 in that order (add, multiply, add; no FMA), the residual term only for non-outlier
positions of a type with a residual codebook.

Type names ``vq-v{v}-k{k}[-{kr}][-o{P}][-g{G}]`` (VPTQ's naming: ``vq-v8-k4096-256`` = vectors of 8,
4096 centroids, 256 residual centroids): ``v`` in {2, 4, 8, 16}; ``k`` and ``kr`` powers of two
(``k`` 4..65536, ``kr`` 2..65536); ``P`` the outlier share in percent of the columns (``n_out =
ceil(C * P / 100)``); ``G`` the number of codebook groups (1..64).

Companions (GGUF shapes reversed; "packed" streams: element ``e`` occupies bits ``[e*w, (e+1)*w)`` of the
byte stream, bit ``n`` being bit ``n % 8`` of byte ``n // 8`` (little-endian bit order), followed by 3 zero
bytes so that a reader may load 32 bits at the byte of any element)::

    NAME.vq_idx         I8   [ceil(R/v * C * log2 k / 8) + 3]        main indices, e = b*C + p
    NAME.vq_ridx        I8   [ceil(R/v * (C-n_out) * log2 kr / 8) + 3]  residual indices, e = b*(C-n_out) + p-n_out
    NAME.vq_books       F16  numpy [G][k][v]
    NAME.vq_rbooks      F16  numpy [G][kr][v]                        (with a residual codebook)
    NAME.vq_obook       F16  numpy [k][v]                            (with outliers)
    NAME.vq_perm        I16 (C <= 32767) / I32  [C]
    NAME.vq_colscale    F16  [C]
    NAME.vq_colbias     F16  [C]
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from ..errors import QggufError
from .base import Fields
from .codebook import F16, I8, I16, I32, Companions, CodebookType, CompanionSpec

VQ_IDX, VQ_RIDX = ".vq_idx", ".vq_ridx"
VQ_BOOKS, VQ_RBOOKS, VQ_OBOOK = ".vq_books", ".vq_rbooks", ".vq_obook"
VQ_PERM, VQ_COLSCALE, VQ_COLBIAS = ".vq_perm", ".vq_colscale", ".vq_colbias"
VQ_V_VALUES = (2, 4, 8, 16)
PACK_PAD = 3
_VQ_RX = re.compile(r"^vq-v(\d+)-k(\d+)(?:-(\d+))?(?:-o(\d+))?(?:-g(\d+))?$", re.IGNORECASE)


# ------------------------------------------------------------------------------------------------
# bit packing


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes of a packed stream of ``n`` elements of ``bits`` bits, with the 3 padding bytes."""
    return (int(n) * int(bits) + 7) // 8 + PACK_PAD


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned integers (< 2^bits) -> the packed byte stream (module docstring), padding included."""
    v = np.asarray(values).reshape(-1).astype(np.uint32)
    bits = int(bits)
    if v.size and int(v.max()) >> bits:
        raise QggufError(f"pack_bits: value {int(v.max())} does not fit in {bits} bits")
    n = v.size
    # bit matrix (n, bits), little-endian within each value, then packed little-endian into bytes
    bm = ((v[:, None] >> np.arange(bits, dtype=np.uint32)[None, :]) & 1).astype(np.uint8).reshape(-1)
    out = np.zeros(packed_nbytes(n, bits), np.uint8)
    body = np.packbits(bm, bitorder="little")
    out[:body.size] = body
    return out


def unpack_bits(data: np.ndarray, n: int, bits: int) -> np.ndarray:
    """The first ``n`` elements of a packed stream as uint32."""
    d = np.asarray(data).view(np.uint8).reshape(-1)
    bits = int(bits)
    need = (int(n) * bits + 7) // 8
    if d.size < need:
        raise QggufError(f"unpack_bits: {d.size} bytes hold fewer than {n} elements of {bits} bits")
    bm = np.unpackbits(d[:need], bitorder="little")[: int(n) * bits].reshape(int(n), bits).astype(np.uint32)
    return (bm << np.arange(bits, dtype=np.uint32)[None, :]).sum(1, dtype=np.uint32)


# ------------------------------------------------------------------------------------------------
# the type


@dataclass(frozen=True)
class VQType(CodebookType):
    v: int = 8
    k: int = 256
    kr: int = 0
    outlier_pct: int = 0
    groups: int = 1

    @property
    def kbits(self) -> int:
        return int(self.k).bit_length() - 1

    @property
    def rbits(self) -> int:
        return int(self.kr).bit_length() - 1 if self.kr else 0

    @property
    def index_bits(self) -> float:
        """Bits of indices per weight (without codebooks, outliers' savings, permutation and norms)."""
        return (self.kbits + self.rbits) / self.v

    def fits_shape(self, shape) -> bool:
        R, C = self._rc(shape)
        return R % self.v == 0 and C - self.n_outliers(C) >= self.groups

    def n_outliers(self, C: int) -> int:
        return min(int(C) - 1, -(-int(C) * self.outlier_pct // 100)) if self.outlier_pct else 0

    def layout(self, shape) -> dict:
        """nb (vectors per column), C, n_out, nc (regular columns), gs (columns per group)."""
        R, C = self._rc(shape)
        if R % self.v:
            raise QggufError(f"{R} rows do not divide into {self.name} vectors of {self.v}")
        n_out = self.n_outliers(C)
        nc = C - n_out
        if nc < self.groups:
            raise QggufError(f"{C} columns are too few for {self.name} ({self.groups} codebook groups)")
        return {"R": R, "nb": R // self.v, "C": C, "n_out": n_out, "nc": nc, "gs": -(-nc // self.groups)}

    def suffixes(self) -> tuple[str, ...]:
        return tuple(c.suffix for c in self.companion_specs((self.v, 2 + self.groups)))

    def companion_specs(self, shape) -> list[CompanionSpec]:
        L = self.layout(shape)
        nb, C, nc = L["nb"], L["C"], L["nc"]
        u8, f16 = np.dtype(np.uint8), np.dtype("<f2")
        specs = [CompanionSpec(VQ_IDX, I8, (packed_nbytes(nb * C, self.kbits),), u8)]
        if self.kr:
            specs.append(CompanionSpec(VQ_RIDX, I8, (packed_nbytes(nb * nc, self.rbits),), u8))
        specs.append(CompanionSpec(VQ_BOOKS, F16, (self.groups, self.k, self.v), f16))
        if self.kr:
            specs.append(CompanionSpec(VQ_RBOOKS, F16, (self.groups, self.kr, self.v), f16))
        if self.outlier_pct:
            specs.append(CompanionSpec(VQ_OBOOK, F16, (self.k, self.v), f16))
        big = C > 32767
        specs += [CompanionSpec(VQ_PERM, I32 if big else I16, (C,), np.dtype("<i4" if big else "<i2")),
                  CompanionSpec(VQ_COLSCALE, F16, (C,), f16),
                  CompanionSpec(VQ_COLBIAS, F16, (C,), f16)]
        return specs

    def shape_of(self, data: Mapping) -> tuple[int, int]:
        perm = data.get(VQ_PERM) if isinstance(data, Mapping) else None
        if perm is None:
            raise QggufError(f"{self.name}: companion {VQ_PERM} is missing (the shape is needed)")
        C = int(np.asarray(perm).size)
        idx = np.asarray(data.get(VQ_IDX, np.zeros(0, np.uint8))).view(np.uint8).size - PACK_PAD
        nb = max(1, (idx * 8) // max(1, C * self.kbits))
        return nb * self.v, C

    def extra_metadata(self) -> dict[str, tuple[Any, Any]]:
        from gguf import GGUFValueType as V
        return {"vq.vector_length": (self.v, V.UINT32), "vq.centroids": (self.k, V.UINT32),
                "vq.residual_centroids": (self.kr, V.UINT32), "vq.outlier_percent": (self.outlier_pct, V.UINT32),
                "vq.groups": (self.groups, V.UINT32)}

    # fields: idx uint32 [nb, C]; ridx uint32 [nb, nc] (kr); books [G, k, v]; rbooks [G, kr, v] (kr);
    # obook [k, v] (outliers); perm int [C]; colscale [C]; colbias [C]
    def _pack_fields(self, fields: Fields) -> Companions:
        need = ["idx", "books", "perm", "colscale", "colbias"] + (["ridx", "rbooks"] if self.kr else []) + \
            (["obook"] if self.outlier_pct else [])
        for k in need:
            if k not in fields:
                raise QggufError(f"{self.name}.pack: field {k!r} is missing (need {', '.join(need)})")
        idx = np.asarray(fields["idx"])
        if idx.ndim != 2 or idx.dtype.kind not in "iu":
            raise QggufError(f"{self.name}.pack: idx must be an integer array [R/v, C], got {idx.dtype} {idx.shape}")
        nb, C = idx.shape
        shape = (nb * self.v, C)
        L = self.layout(shape)
        specs = {c.suffix: c for c in self.companion_specs(shape)}
        if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= self.k):
            raise QggufError(f"{self.name}.pack: indices out of range 0..{self.k - 1}")
        perm = np.asarray(fields["perm"]).reshape(-1)
        if perm.shape != (C,) or perm.dtype.kind not in "iu" or not np.array_equal(np.sort(perm), np.arange(C)):
            raise QggufError(f"{self.name}.pack: perm must be a permutation of 0..{C - 1}")
        out = Companions()
        out[VQ_IDX] = pack_bits(idx, self.kbits)
        if self.kr:
            ridx = np.asarray(fields["ridx"])
            if ridx.shape != (nb, L["nc"]) or ridx.dtype.kind not in "iu":
                raise QggufError(f"{self.name}.pack: ridx must be integers of shape {(nb, L['nc'])}, got {ridx.shape}")
            if ridx.size and (int(ridx.min()) < 0 or int(ridx.max()) >= self.kr):
                raise QggufError(f"{self.name}.pack: residual indices out of range 0..{self.kr - 1}")
            out[VQ_RIDX] = pack_bits(ridx, self.rbits)

        def f16(key, shp):
            a = np.asarray(fields[key])
            if a.size != int(np.prod(shp)):
                raise QggufError(f"{self.name}.pack: {key} must have shape {shp}, got {a.shape}")
            a = np.ascontiguousarray(a.reshape(shp), dtype="<f2")
            if not np.isfinite(a).all():
                raise QggufError(f"{self.name}.pack: {key} is not finite in float16")
            return a

        out[VQ_BOOKS] = f16("books", specs[VQ_BOOKS].shape)
        if self.kr:
            out[VQ_RBOOKS] = f16("rbooks", specs[VQ_RBOOKS].shape)
        if self.outlier_pct:
            out[VQ_OBOOK] = f16("obook", specs[VQ_OBOOK].shape)
        out[VQ_PERM] = np.ascontiguousarray(perm, dtype=specs[VQ_PERM].dtype)
        out[VQ_COLSCALE] = f16("colscale", (C,))
        out[VQ_COLBIAS] = f16("colbias", (C,))
        return out

    def _unpack_arrays(self, comp: Companions) -> Fields:
        C = int(np.asarray(comp[VQ_PERM]).size)
        bytes_idx = np.asarray(comp[VQ_IDX]).size - PACK_PAD
        # nb from the stream length: the largest nb whose packed size matches
        nb = (bytes_idx * 8) // (C * self.kbits)
        while nb > 0 and (nb * C * self.kbits + 7) // 8 != bytes_idx:
            nb -= 1
        L = self.layout((nb * self.v, C))
        f = {"idx": unpack_bits(comp[VQ_IDX], nb * C, self.kbits).reshape(nb, C),
             "books": comp[VQ_BOOKS], "perm": comp[VQ_PERM], "colscale": comp[VQ_COLSCALE],
             "colbias": comp[VQ_COLBIAS]}
        if self.kr:
            f["ridx"] = unpack_bits(comp[VQ_RIDX], nb * L["nc"], self.rbits).reshape(nb, L["nc"])
            f["rbooks"] = comp[VQ_RBOOKS]
        if self.outlier_pct:
            f["obook"] = comp[VQ_OBOOK]
        return f

    def group_of(self, C: int) -> np.ndarray:
        """Codebook group of every position (-1: outlier)."""
        L = self.layout((self.v, C))
        g = np.full(C, -1, np.int64)
        g[L["n_out"]:] = np.arange(L["nc"]) // L["gs"]
        return g

    def dequantize_fields(self, fields: Fields) -> np.ndarray:
        idx = np.asarray(fields["idx"]).astype(np.intp)
        nb, C = idx.shape
        v = self.v
        L = self.layout((nb * v, C))
        books = np.asarray(fields["books"], np.float32)
        grp = self.group_of(C)
        q = np.empty((nb, C, v), np.float32)
        n_out = L["n_out"]
        if n_out:
            q[:, :n_out] = np.asarray(fields["obook"], np.float32)[idx[:, :n_out]]
        gr = grp[n_out:]
        q[:, n_out:] = books[gr[None, :], idx[:, n_out:]]
        if self.kr:
            rb = np.asarray(fields["rbooks"], np.float32)
            q[:, n_out:] += rb[gr[None, :], np.asarray(fields["ridx"]).astype(np.intp)]
        s = np.asarray(fields["colscale"], np.float32).reshape(-1)
        b = np.asarray(fields["colbias"], np.float32).reshape(-1)
        q *= s[None, :, None]
        q += b[None, :, None]
        wp = q.transpose(0, 2, 1).reshape(nb * v, C)          # [R, p]
        out = np.empty_like(wp)
        out[:, np.asarray(fields["perm"]).astype(np.intp).reshape(-1)] = wp
        return out

    def random_fields(self, shape, rng: np.random.Generator | None = None, std: float | None = None) -> Fields:
        """Random indices, codebooks, permutation and norms for a weight of ``shape`` whose values have roughly
        standard deviation ``std`` (default 1/sqrt(C)): synthetic models and tests."""
        rng = rng or np.random.default_rng(0)
        L = self.layout(shape)
        nb, C, nc = L["nb"], L["C"], L["nc"]
        std = float(std) if std is not None else 1.0 / math.sqrt(C)
        f = {"idx": rng.integers(0, self.k, size=(nb, C), dtype=np.int64).astype(np.uint32),
             "books": (rng.standard_normal((self.groups, self.k, self.v)) * 0.9).astype(np.float16),
             "perm": rng.permutation(C).astype(np.int64),
             "colscale": (std * (0.75 + 0.5 * rng.random(C))).astype(np.float16),
             "colbias": (0.05 * std * rng.standard_normal(C)).astype(np.float16)}
        if self.kr:
            f["ridx"] = rng.integers(0, self.kr, size=(nb, nc), dtype=np.int64).astype(np.uint32)
            f["rbooks"] = (rng.standard_normal((self.groups, self.kr, self.v)) * 0.3).astype(np.float16)
        if self.outlier_pct:
            f["obook"] = (rng.standard_normal((self.k, self.v)) * 1.5).astype(np.float16)
        return f


def vq_type(v: int, k: int, kr: int = 0, outlier_pct: int = 0, groups: int = 1) -> VQType:
    def pow2(x):
        return x > 0 and (x & (x - 1)) == 0
    if v not in VQ_V_VALUES:
        raise QggufError(f"VQ: vector length v={v} must be one of 2, 4, 8, 16")
    if not pow2(k) or not 4 <= k <= 65536:
        raise QggufError(f"VQ: centroids k={k} must be a power of two in 4..65536")
    if kr and (not pow2(kr) or not 2 <= kr <= 65536):
        raise QggufError(f"VQ: residual centroids {kr} must be a power of two in 2..65536")
    if not 0 <= outlier_pct <= 50:
        raise QggufError(f"VQ: outlier share -o{outlier_pct} must be 0..50 percent")
    if not 1 <= groups <= 64:
        raise QggufError(f"VQ: codebook groups -g{groups} must be 1..64")
    name = f"vq-v{v}-k{k}" + (f"-{kr}" if kr else "") + (f"-o{outlier_pct}" if outlier_pct else "") + \
        (f"-g{groups}" if groups > 1 else "")
    desc = (f"VQ: vectors of {v}, {groups} group(s) of {k} centroids" + (f" + {kr} residual" if kr else "")
            + (f", {outlier_pct}% outlier columns with their own codebook" if outlier_pct else ""))
    return VQType(name=name, ggml_type=None, block_size=1, type_size=1, family="vq", description=desc,
                  standard=False, v=v, k=k, kr=kr, outlier_pct=outlier_pct, groups=groups)


def parse_vq(name: str) -> VQType | None:
    """``vq-v8-k4096[-256][-o1][-g4]`` -> :class:`VQType`; None if ``name`` is not of that form; QggufError if
    it is but the parameters are out of range."""
    m = _VQ_RX.match(str(name).strip())
    if not m:
        return None
    v, k, kr, o, g = m.groups()
    return vq_type(int(v), int(k), int(kr or 0), int(o or 0), int(g or 1))


VQ_NAMED = ("vq-v8-k4096-256", "vq-v8-k256-256", "vq-v4-k256")
TYPES = [parse_vq(n) for n in VQ_NAMED]
PARSERS = [parse_vq]

__all__ = ["VQType", "vq_type", "parse_vq", "pack_bits", "unpack_bits", "packed_nbytes", "VQ_IDX", "VQ_RIDX",
           "VQ_BOOKS", "VQ_RBOOKS", "VQ_OBOOK", "VQ_PERM", "VQ_COLSCALE", "VQ_COLBIAS", "PACK_PAD"]
