"""qgguf's codebook tensor types (AQ now; VQ later): weights stored as several *companion* tensors.

A codebook type has no ggml type id. A weight ``NAME`` of such a type is written as companion tensors
``NAME<suffix>`` in standard container types (I8/I16/I32 for integer payloads, F16/F32 for floats), so that
any GGUF v3 reader (``gguf.GGUFReader``) can read the file, plus namespaced metadata (docs/FORMAT.md,
"AQ tensors")::

    qgguf.version                   uint32  format version (1)
    qgguf.tensor.NAME.type          string  family: "aq"
    qgguf.tensor.NAME.config        string  full type name, e.g. "aq-2x8-g8"
    qgguf.tensor.NAME.shape         [uint64] GGUF shape [ne0, ne1] = [in_features C, out_features R]
    qgguf.tensor.NAME.companions    [string] the companion suffixes, in file order
    (+ the family's own parameters, e.g. qgguf.tensor.NAME.aq.{num_codebooks,code_bits,group_size})

The interface is :class:`CodebookType` (QuantType-compatible: ``name``, ``standard=False``, ``ggml_type=None``,
``block_size``, ``nbytes(shape)`` counting every byte of every companion, ``bits_per_weight(shape)``):

* ``companions(shape)`` -> ``[(suffix, container ggml type, GGUF shape)]``: sizes known before any data exists;
* ``pack(fields)`` -> :class:`Companions` (a ``{suffix: array}`` dict, also usable as one flat uint8 blob:
  ``np.asarray(packed)`` concatenates the companions in order, so code that passes packed tensors around as
  bytes - checkpoints, ``nbytes`` checks - keeps working);
* ``unpack(data, shape=None)`` -> fields; ``dequantize(data, shape=None)`` -> float32 ``(R, C)``; ``data`` is a
  :class:`Companions`, any ``{suffix: array}`` mapping, or the flat blob (then ``shape`` is required);
* ``metadata(name, shape)`` -> ``{key: MetaValue}`` of the ``qgguf.*`` keys for one tensor.

AQ (additive multi-codebook quantization, AQLM-style), type names ``aq-MxB-gG`` (``M`` codebooks of ``2^B``
entries of ``G`` values; optional ``-s16`` suffix: float16 scales instead of float32)::

    W[r, j*g:(j+1)*g] = scales[r] * sum_m codebooks[m][codes[j, m, r]]
    codes      uint8 (B=8) / uint16 (B=16)   numpy [C/g][M][R]   -> NAME.aq_codes      I8 / I16, GGUF [R, M, C/g]
    codebooks  float16                       numpy [M][2^B][g]   -> NAME.aq_codebooks  F16,      GGUF [g, 2^B, M]
    scales     float32 (float16 with -s16)   numpy [R]           -> NAME.aq_scales     F32/F16,  GGUF [R]
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from ..errors import InputFileError, QggufError
from .base import Fields, QuantType

QGGUF_FORMAT_VERSION = 1
META_PREFIX = "qgguf.tensor."

# ggml type ids of the container types (gguf.GGMLQuantizationType)
F32, F16, I8, I16, I32 = 0, 1, 24, 25, 26
_CONTAINER_DTYPE = {F32: np.dtype("<f4"), F16: np.dtype("<f2"), I8: np.dtype("i1"), I16: np.dtype("<i2"),
                    I32: np.dtype("<i4")}
_CONTAINER_NAME = {F32: "F32", F16: "F16", I8: "I8", I16: "I16", I32: "I32"}


@dataclass(frozen=True)
class CompanionSpec:
    """One companion tensor of a codebook tensor: ``NAME + suffix``, stored as ``ggml_type`` with numpy
    ``shape`` (``gguf_shape`` is the reverse). ``dtype``: the numpy dtype of the field it carries (e.g. uint8
    codes in an I8 container: the same bytes)."""
    suffix: str
    ggml_type: int
    shape: tuple[int, ...]
    dtype: np.dtype
    qtype: Any = None       # a standard quantized type (row-tiered tensors): ``shape`` counts weights, the data
                            # is that type's bytes, ``array_shape`` (rows, row bytes) of uint8

    @property
    def gguf_shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.shape))

    @property
    def nbytes(self) -> int:
        if self.qtype is not None:
            return int(self.qtype.nbytes(self.shape))
        return int(np.prod(self.shape)) * _CONTAINER_DTYPE[self.ggml_type].itemsize

    @property
    def array_shape(self) -> tuple[int, ...]:
        """The numpy shape of the companion's array (``shape``, or (rows, row bytes) for a standard type)."""
        if self.qtype is not None:
            return (int(np.prod(self.shape[:-1])), int(self.qtype.row_bytes(self.shape[-1])))
        return self.shape

    @property
    def container(self) -> str:
        return self.qtype.name if self.qtype is not None else _CONTAINER_NAME[self.ggml_type]


class Companions(dict):
    """``{suffix: array}`` of one codebook tensor, in file order. ``np.asarray(c)`` is the flat uint8 blob of
    all companions (in order, no padding); ``c.nbytes`` its size."""

    def blob(self) -> np.ndarray:
        parts = [np.ascontiguousarray(a).view(np.uint8).reshape(-1) for a in self.values()]
        return np.concatenate(parts) if parts else np.empty(0, np.uint8)

    def __array__(self, dtype=None, copy=None):
        b = self.blob()
        return b if dtype is None else b.astype(dtype)

    @property
    def nbytes(self) -> int:
        return int(sum(np.asarray(a).nbytes for a in self.values()))


def _meta(value, vtype, sub_type=None):
    from ..convert.ggufread import MetaValue
    return MetaValue(value, vtype, sub_type)


@dataclass(frozen=True)
class CodebookType(QuantType):
    """Base class of qgguf's codebook types (module docstring). Subclasses implement ``family``,
    ``companion_specs``, ``_pack_fields``, ``_unpack_arrays``, ``dequantize_fields`` and ``extra_metadata``."""

    family: str = ""

    # --- shapes ----------------------------------------------------------------------------------
    @staticmethod
    def _rc(shape) -> tuple[int, int]:
        shape = tuple(int(s) for s in shape)
        if len(shape) == 1:
            return 1, shape[0]
        R = int(np.prod(shape[:-1]))
        return R, shape[-1]

    def companion_specs(self, shape) -> list[CompanionSpec]:  # pragma: no cover - interface
        raise NotImplementedError

    def companions(self, shape) -> list[tuple[str, int, tuple[int, ...]]]:
        """``[(suffix, container ggml type id, GGUF shape)]`` for a weight of numpy ``shape`` ``(R, C)``."""
        return [(c.suffix, c.ggml_type, c.gguf_shape) for c in self.companion_specs(shape)]

    def suffixes(self) -> tuple[str, ...]:
        return tuple(c.suffix for c in self.companion_specs((1, self.block_size)))

    def nbytes(self, shape) -> int:
        """Every byte of the tensor: all companions (no alignment padding)."""
        return int(sum(c.nbytes for c in self.companion_specs(shape)))

    def bits_per_weight(self, shape) -> float:
        R, C = self._rc(shape)
        return 8.0 * self.nbytes(shape) / max(1, R * C)

    def row_bytes(self, n: int) -> int:
        """Bytes of one row's codes (codebooks and scales are per tensor: see :meth:`nbytes`)."""
        self.check_row_length(n)
        return n // self.block_size * self.type_size

    # --- data --------------------------------------------------------------------------------------
    def split(self, blob: np.ndarray, shape) -> Companions:
        """The flat uint8 blob (``np.asarray(pack(...))``) -> :class:`Companions` (views, no copies)."""
        blob = np.ascontiguousarray(blob).view(np.uint8).reshape(-1)
        specs = self.companion_specs(shape)
        need = sum(c.nbytes for c in specs)
        if blob.size != need:
            raise QggufError(f"{self.name} data of {blob.size} bytes for shape {tuple(shape)} (expected {need})")
        out, o = Companions(), 0
        for c in specs:
            out[c.suffix] = blob[o:o + c.nbytes].view(c.dtype).reshape(c.array_shape)
            o += c.nbytes
        return out

    def as_companions(self, data, shape=None) -> Companions:
        """Companions from a mapping (``{suffix: array}``; arrays checked against the specs) or a flat blob."""
        if isinstance(data, Mapping):
            if shape is None:
                shape = self.shape_of(data)
            specs = self.companion_specs(shape)
            out = Companions()
            for c in specs:
                if c.suffix not in data:
                    raise QggufError(f"{self.name}: companion {c.suffix} is missing")
                a = np.asarray(data[c.suffix])
                want = _CONTAINER_DTYPE[c.ggml_type] if c.qtype is None else np.dtype(np.uint8)
                if a.dtype.itemsize != want.itemsize or a.dtype.kind not in ("i", "u", "f") or \
                        (a.dtype.kind == "f") != (want.kind == "f"):
                    raise QggufError(f"{self.name}: companion {c.suffix} has dtype {a.dtype}, expected "
                                     f"{c.container} ({c.dtype})")
                if int(a.size) != int(np.prod(c.array_shape)):
                    raise QggufError(f"{self.name}: companion {c.suffix} has shape {a.shape}, expected "
                                     f"{c.array_shape} for a weight of shape {tuple(shape)}")
                out[c.suffix] = np.ascontiguousarray(a).view(c.dtype).reshape(c.array_shape)
            return out
        if shape is None:
            raise QggufError(f"{self.name}: the shape is needed to split packed bytes")
        return self.split(data, shape)

    def shape_of(self, data: Mapping) -> tuple[int, int]:  # pragma: no cover - interface
        """numpy shape ``(R, C)`` of the weight that companions ``data`` encode."""
        raise NotImplementedError

    def pack(self, fields: Mapping[str, np.ndarray]) -> Companions:
        return self._pack_fields(dict(fields))

    def unpack(self, data, shape=None) -> Fields:
        return self._unpack_arrays(self.as_companions(data, shape))

    def values(self, fields: Mapping[str, np.ndarray]) -> np.ndarray:
        return self.dequantize_fields(dict(fields))

    def dequantize(self, data, shape=None) -> np.ndarray:
        f = self.unpack(data, shape)
        try:
            w = self.dequantize_fields(f)
        except IndexError as e:   # an index field (codes, permutation) pointing outside its table: corrupt data
            raise QggufError(f"{self.name}: corrupt data: {e}") from None
        return w.reshape(shape) if shape is not None else w

    def quantize(self, x: np.ndarray, importance: np.ndarray | None = None):
        raise QggufError(f"{self.name} is a codebook type: it needs a codebook method (--method aq), "
                         "not round-to-nearest")

    # --- metadata ----------------------------------------------------------------------------------
    def metadata(self, name: str, shape) -> dict[str, Any]:
        """``{key: MetaValue}``: the ``qgguf.tensor.NAME.*`` keys of one tensor (``qgguf.version`` is the
        writer's)."""
        from gguf import GGUFValueType as V
        R, C = self._rc(shape)
        p = f"{META_PREFIX}{name}."
        md = {p + "type": _meta(self.family, V.STRING),
              p + "config": _meta(self.name, V.STRING),
              p + "shape": _meta([C, R], V.ARRAY, V.UINT64),
              p + "companions": _meta([c.suffix for c in self.companion_specs(shape)], V.ARRAY, V.STRING)}
        for k, (v, t) in self.extra_metadata().items():
            md[p + k] = _meta(v, t)
        return md

    def extra_metadata(self) -> dict[str, tuple[Any, Any]]:
        return {}

    # subclass hooks
    def _pack_fields(self, fields: Fields) -> Companions:  # pragma: no cover - interface
        raise NotImplementedError

    def _unpack_arrays(self, comp: Companions) -> Fields:  # pragma: no cover - interface
        raise NotImplementedError

    def dequantize_fields(self, fields: Fields) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError


# ------------------------------------------------------------------------------------------------
# AQ

AQ_CODES, AQ_CODEBOOKS, AQ_SCALES = ".aq_codes", ".aq_codebooks", ".aq_scales"
AQ_M_RANGE = range(1, 9)
AQ_B_VALUES = (8, 16)
AQ_G_VALUES = (4, 8, 16, 32)
_AQ_RX = re.compile(r"^aq-(\d+)x(\d+)-g(\d+)(-s16)?$", re.IGNORECASE)


@dataclass(frozen=True)
class AQType(CodebookType):
    M: int = 2
    B: int = 8
    g: int = 8
    scale_f16: bool = False

    @property
    def bpw(self) -> float:
        """Bits per weight of the codes alone (M*B/g); :meth:`bits_per_weight` counts every byte."""
        return self.M * self.B / self.g

    @property
    def K(self) -> int:
        return 1 << self.B

    @property
    def codes_dtype(self) -> np.dtype:
        return np.dtype(np.uint8) if self.B == 8 else np.dtype("<u2")

    def companion_specs(self, shape) -> list[CompanionSpec]:
        R, C = self._rc(shape)
        if C % self.g:
            raise QggufError(f"rows of {C} values do not divide into {self.name} groups of {self.g}")
        return [CompanionSpec(AQ_CODES, I8 if self.B == 8 else I16, (C // self.g, self.M, R), self.codes_dtype),
                CompanionSpec(AQ_CODEBOOKS, F16, (self.M, self.K, self.g), np.dtype("<f2")),
                CompanionSpec(AQ_SCALES, F16 if self.scale_f16 else F32, (R,),
                              np.dtype("<f2") if self.scale_f16 else np.dtype("<f4"))]

    def shape_of(self, data: Mapping) -> tuple[int, int]:
        codes = data.get(AQ_CODES) if isinstance(data, Mapping) else None
        if codes is None:
            raise QggufError(f"{self.name}: companion {AQ_CODES} is missing")
        codes = np.asarray(codes)
        if codes.ndim != 3 or codes.shape[1] != self.M:
            raise QggufError(f"{self.name}: codes must have shape [C/g, {self.M}, R], got {codes.shape}")
        return int(codes.shape[2]), int(codes.shape[0]) * self.g

    def extra_metadata(self) -> dict[str, tuple[Any, Any]]:
        from gguf import GGUFValueType as V
        return {"aq.num_codebooks": (self.M, V.UINT32), "aq.code_bits": (self.B, V.UINT32),
                "aq.group_size": (self.g, V.UINT32)}

    def _pack_fields(self, fields: Fields) -> Companions:
        for k in ("codes", "codebooks", "scales"):
            if k not in fields:
                raise QggufError(f"{self.name}.pack: field {k!r} is missing (need codes, codebooks, scales)")
        codes = np.asarray(fields["codes"])
        if codes.ndim != 3 or codes.shape[1] != self.M:
            raise QggufError(f"{self.name}.pack: codes must have shape [C/g, {self.M}, R], got {codes.shape}")
        if codes.dtype.kind not in "iu":
            raise QggufError(f"{self.name}.pack: codes must be integers, got {codes.dtype}")
        if codes.size and (int(codes.min()) < 0 or int(codes.max()) >= self.K):
            raise QggufError(f"{self.name}.pack: codes out of range 0..{self.K - 1}")
        J, _, R = codes.shape
        C = J * self.g
        cb = np.asarray(fields["codebooks"])
        if cb.shape != (self.M, self.K, self.g):
            raise QggufError(f"{self.name}.pack: codebooks must have shape {(self.M, self.K, self.g)}, got {cb.shape}")
        sc = np.asarray(fields["scales"]).reshape(-1)
        if sc.shape != (R,):
            raise QggufError(f"{self.name}.pack: scales must have shape ({R},), got {np.asarray(fields['scales']).shape}")
        out = Companions()
        specs = self.companion_specs((R, C))
        out[AQ_CODES] = np.ascontiguousarray(codes, dtype=self.codes_dtype)
        cb16 = np.ascontiguousarray(cb, dtype="<f2")
        sc_out = np.ascontiguousarray(sc, dtype=specs[2].dtype)
        if not (np.isfinite(cb16).all() and np.isfinite(sc_out).all()):
            raise QggufError(f"{self.name}.pack: codebooks or scales are not finite (in their stored precision)")
        out[AQ_CODEBOOKS] = cb16
        out[AQ_SCALES] = sc_out
        return out

    def _unpack_arrays(self, comp: Companions) -> Fields:
        return {"codes": comp[AQ_CODES], "codebooks": comp[AQ_CODEBOOKS], "scales": comp[AQ_SCALES]}

    def dequantize_fields(self, fields: Fields) -> np.ndarray:
        codes = np.asarray(fields["codes"])
        cb = np.asarray(fields["codebooks"], dtype=np.float32)
        sc = np.asarray(fields["scales"], dtype=np.float32).reshape(-1)
        J, M, R = codes.shape
        g = cb.shape[-1]
        acc = np.zeros((R, J, g), np.float32)
        idx = codes.astype(np.intp)
        for m in range(M):                    # the order the native kernels sum in (bit-exact)
            acc += cb[m][idx[:, m, :].T]      # [R, J, g]
        acc *= sc[:, None, None]
        return acc.reshape(R, J * g)

    def random_fields(self, shape, rng: np.random.Generator | None = None, std: float | None = None) -> Fields:
        """Random codes, codebooks and scales for a weight of ``shape`` (R, C) whose values have roughly
        standard deviation ``std`` (default 1/sqrt(C)): synthetic models and tests."""
        rng = rng or np.random.default_rng(0)
        R, C = self._rc(shape)
        if C % self.g:
            raise QggufError(f"rows of {C} values do not divide into {self.name} groups of {self.g}")
        std = float(std) if std is not None else 1.0 / np.sqrt(C)
        codes = rng.integers(0, self.K, size=(C // self.g, self.M, R), dtype=np.int64).astype(self.codes_dtype)
        cb = (rng.standard_normal((self.M, self.K, self.g)) / np.sqrt(self.M)).astype(np.float16)
        sc = (std * (0.75 + 0.5 * rng.random(R))).astype(np.float16 if self.scale_f16 else np.float32)
        return {"codes": codes, "codebooks": cb, "scales": sc}


def aq_type(M: int, B: int, g: int, scale_f16: bool = False) -> AQType:
    if M not in AQ_M_RANGE:
        raise QggufError(f"AQ: number of codebooks M={M} must be in 1..8")
    if B not in AQ_B_VALUES:
        raise QggufError(f"AQ: code bits B={B} must be 8 or 16")
    if g not in AQ_G_VALUES:
        raise QggufError(f"AQ: group size g={g} must be one of 4, 8, 16, 32")
    name = f"aq-{M}x{B}-g{g}" + ("-s16" if scale_f16 else "")
    return AQType(name=name, ggml_type=None, block_size=g, type_size=M * B // 8, family="aq",
                  description=f"AQ: {M} codebook(s) of 2^{B} entries x {g} values, "
                              f"{'float16' if scale_f16 else 'float32'} row scales",
                  standard=False, M=M, B=B, g=g, scale_f16=scale_f16)


def parse_aq(name: str) -> AQType | None:
    """``aq-MxB-gG[-s16]`` -> :class:`AQType`; None if ``name`` is not of that form; QggufError if it is but
    the parameters are out of range."""
    m = _AQ_RX.match(name.strip())
    if not m:
        return None
    return aq_type(int(m.group(1)), int(m.group(2)), int(m.group(3)), bool(m.group(4)))


# the configurations listed by gguf_types.names(); any other aq-MxB-gG resolves through parse_aq
AQ_NAMED = ("aq-2x8-g8", "aq-1x16-g8", "aq-1x8-g8", "aq-4x8-g8", "aq-2x8-g16")
TYPES = [parse_aq(n) for n in AQ_NAMED]
PARSERS = [parse_aq]


def is_codebook(qt) -> bool:
    return isinstance(qt, CodebookType)


def codebook_tensors(metadata: Mapping[str, Any]) -> dict[str, CodebookType]:
    """``{tensor name: CodebookType}`` from a file's metadata (plain values or MetaValue objects)."""
    from . import get
    out = {}
    for k, v in metadata.items():
        if k.startswith(META_PREFIX) and k.endswith(".config"):
            val = getattr(v, "value", v)
            if isinstance(val, (bytes, bytearray)):
                val = val.decode()
            name = k[len(META_PREFIX):-len(".config")]
            qt = get(str(val))
            if not isinstance(qt, CodebookType):
                raise QggufError(f"tensor {name}: qgguf type {val!r} is not a codebook type")
            out[name] = qt
    return out


def _plain(v):
    v = getattr(v, "value", v)
    return bytes(v).decode("utf-8", "surrogateescape") if isinstance(v, (bytes, bytearray)) else v


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


MAX_CODEBOOK_DIM = (1 << 31) - 1


def check_codebook_layout(metadata: Mapping[str, Any], tensors: Mapping[str, tuple[int, tuple[int, ...]]],
                          path=None) -> dict[str, tuple[CodebookType, tuple[int, int]]]:
    """Check every codebook tensor of a file before any of its data is used: ``qgguf.tensor.NAME.*`` metadata
    of the right value types (config a known codebook type of the stated family, shape two positive integers,
    the family's own parameters and the companion list as the config implies) and every companion present in
    ``tensors`` (``{name: (ggml type id, GGUF ne)}``) with the container type and shape the type gives.
    Returns ``{NAME: (type, numpy shape (R, C))}``; raises :class:`InputFileError` naming ``path``."""
    from . import get

    ver = _plain(metadata.get("qgguf.version"))
    if ver is not None and (not _is_int(ver) or not 1 <= ver <= QGGUF_FORMAT_VERSION):
        raise InputFileError(f"qgguf.version {ver!r} is not supported (this qgguf reads 1..{QGGUF_FORMAT_VERSION})",
                             path)
    out: dict[str, tuple[CodebookType, tuple[int, int]]] = {}
    for k in metadata:
        if not (k.startswith(META_PREFIX) and k.endswith(".config")):
            continue
        name = k[len(META_PREFIX):-len(".config")]
        p = f"{META_PREFIX}{name}."
        cfg = _plain(metadata[k])
        if not isinstance(cfg, str):
            raise InputFileError(f"tensor {name}: {k} must be a string, got {cfg!r}", path)
        try:
            qt = get(cfg)
        except QggufError as e:
            raise InputFileError(f"tensor {name}: {e.problem}", path) from None
        if not isinstance(qt, CodebookType):
            raise InputFileError(f"tensor {name}: qgguf type {cfg!r} is not a codebook type", path)
        fam = _plain(metadata.get(p + "type"))
        if fam is not None and fam != qt.family:
            raise InputFileError(f"tensor {name}: {p}type is {fam!r} but its config {cfg!r} is {qt.family!r}", path)
        shp = _plain(metadata.get(p + "shape"))
        if not isinstance(shp, (list, tuple)) or len(shp) != 2 or not all(_is_int(v) for v in shp) \
                or not all(1 <= int(v) <= MAX_CODEBOOK_DIM for v in shp):
            raise InputFileError(f"tensor {name}: {p}shape must be two positive integers [in, out], got {shp!r}",
                                 path)
        shape = (int(shp[1]), int(shp[0]))
        for key, (want, _t) in qt.extra_metadata().items():
            got = _plain(metadata.get(p + key))
            if got is not None and got != want:
                raise InputFileError(f"tensor {name}: {p}{key} is {got!r} but {qt.name} has {want!r}", path)
        try:
            specs = qt.companion_specs(shape)
        except QggufError as e:
            raise InputFileError(f"tensor {name}: {e.problem}", path) from None
        listed = _plain(metadata.get(p + "companions"))
        if listed is not None and (not isinstance(listed, list) or listed != [c.suffix for c in specs]):
            raise InputFileError(f"tensor {name}: {p}companions is {listed!r}, expected "
                                 f"{[c.suffix for c in specs]} for {qt.name}", path)
        if name in tensors:
            raise InputFileError(f"tensor {name} is both a plain tensor and a {qt.name} codebook tensor", path)
        for c in specs:
            t = tensors.get(name + c.suffix)
            if t is None:
                raise InputFileError(f"tensor {name} ({qt.name}): companion tensor {name}{c.suffix} is missing",
                                     path)
            tt, ne = int(t[0]), tuple(int(v) for v in t[1])
            while len(ne) > len(c.gguf_shape) and ne[-1] == 1:
                ne = ne[:-1]
            if tt != c.ggml_type or ne != c.gguf_shape:
                raise InputFileError(f"tensor {name} ({qt.name}, shape {[shape[1], shape[0]]}): companion "
                                     f"{name}{c.suffix} is {_CONTAINER_NAME.get(tt, f'type {tt}')} {list(ne)}, "
                                     f"expected {c.container} {list(c.gguf_shape)}", path)
        out[name] = (qt, shape)
    return out


__all__ = ["CodebookType", "AQType", "Companions", "CompanionSpec", "parse_aq", "aq_type", "is_codebook",
           "codebook_tensors", "check_codebook_layout", "QGGUF_FORMAT_VERSION", "META_PREFIX", "AQ_CODES", "AQ_CODEBOOKS", "AQ_SCALES"]
