"""A fast, strict GGUF reader (header, metadata, tensor table; tensor data by mmap).

``gguf.GGUFReader`` builds numpy views for every array element and takes seconds on a
49k-token vocabulary; this parser reads the same structure in tens of milliseconds and turns
every defect (wrong magic, truncation, offsets past the end, unknown types) into an
:class:`~qgguf.errors.InputFileError` naming the file.
"""
from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from ..errors import InputFileError

GGUF_MAGIC = b"GGUF"
MAX_DIMS = 4                   # GGML_MAX_DIMS
MAX_ALIGNMENT = 1 << 16
CODEBOOK_META_PREFIX = "qgguf.tensor."

_SCALAR = {
    GGUFValueType.UINT8: ("<B", 1), GGUFValueType.INT8: ("<b", 1),
    GGUFValueType.UINT16: ("<H", 2), GGUFValueType.INT16: ("<h", 2),
    GGUFValueType.UINT32: ("<I", 4), GGUFValueType.INT32: ("<i", 4),
    GGUFValueType.FLOAT32: ("<f", 4), GGUFValueType.BOOL: ("<?", 1),
    GGUFValueType.UINT64: ("<Q", 8), GGUFValueType.INT64: ("<q", 8),
    GGUFValueType.FLOAT64: ("<d", 8),
}
_NP = {
    GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1", GGUFValueType.UINT16: "<u2",
    GGUFValueType.INT16: "<i2", GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4",
    GGUFValueType.FLOAT32: "<f4", GGUFValueType.BOOL: "?", GGUFValueType.UINT64: "<u8",
    GGUFValueType.INT64: "<i8", GGUFValueType.FLOAT64: "<f8",
}
_INT_TYPES = (GGUFValueType.UINT8, GGUFValueType.INT8, GGUFValueType.UINT16, GGUFValueType.INT16,
              GGUFValueType.UINT32, GGUFValueType.INT32, GGUFValueType.UINT64, GGUFValueType.INT64)


@dataclass
class MetaValue:
    """One metadata value with its GGUF type (``sub_type``: element type of an array)."""
    value: Any
    vtype: GGUFValueType
    sub_type: GGUFValueType | None = None


@dataclass
class TensorEntry:
    name: str
    ne: tuple[int, ...]          # GGUF order: ne[0] is the row length
    ggml_type: int
    offset: int                  # absolute offset in the file
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """numpy order (rows..., row length)."""
        return tuple(reversed(self.ne))


class _Cursor:
    def __init__(self, buf, path):
        self.buf, self.pos, self.path, self.size = buf, 0, path, len(buf)

    def need(self, n: int) -> None:
        if self.pos + n > self.size:
            raise InputFileError(f"truncated GGUF file (header ends at byte {self.size}, needs {self.pos + n})", self.path)

    def unpack(self, fmt: str, n: int):
        self.need(n)
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return v

    def string(self, what: str | None = None) -> str:
        """A GGUF string. ``what`` (a key or a tensor name) must be valid UTF-8 and not empty; values may hold
        any bytes (kept with surrogate escapes, as tokens of some vocabularies do)."""
        start = self.pos
        n = self.unpack("<Q", 8)
        self.need(n)
        b = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        if what is not None:
            if not b:
                raise InputFileError(f"corrupt GGUF file: empty {what} at byte {start}", self.path)
            try:
                return b.decode("utf-8")
            except UnicodeDecodeError:
                raise InputFileError(f"corrupt GGUF file: {what} at byte {start} is not UTF-8 ({b[:40]!r})",
                                     self.path) from None
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            return b.decode("utf-8", errors="surrogateescape")

    def vtype(self) -> GGUFValueType:
        t = self.unpack("<I", 4)
        try:
            return GGUFValueType(t)
        except ValueError:
            raise InputFileError(f"corrupt GGUF metadata: unknown value type {t} at byte {self.pos - 4}", self.path) from None

    def value(self, vt: GGUFValueType) -> MetaValue:
        if vt == GGUFValueType.STRING:
            return MetaValue(self.string(), vt)
        if vt == GGUFValueType.ARRAY:
            sub = self.vtype()
            n = self.unpack("<Q", 8)
            if sub == GGUFValueType.STRING:
                out = []
                buf, pos, size = self.buf, self.pos, self.size
                unpack_from = struct.unpack_from
                for _ in range(n):
                    if pos + 8 > size:
                        self.pos = pos
                        self.need(8)
                    ln = unpack_from("<Q", buf, pos)[0]
                    pos += 8
                    if pos + ln > size:
                        self.pos = pos
                        self.need(ln)
                    b = bytes(buf[pos:pos + ln])
                    try:
                        out.append(b.decode("utf-8"))
                    except UnicodeDecodeError:
                        out.append(b.decode("utf-8", errors="surrogateescape"))
                    pos += ln
                self.pos = pos
                return MetaValue(out, vt, sub)
            if sub == GGUFValueType.ARRAY:
                raise InputFileError("nested metadata arrays are not supported", self.path)
            fmt, sz = _SCALAR[sub]
            self.need(n * sz)
            arr = np.frombuffer(self.buf, dtype=_NP[sub], count=n, offset=self.pos).copy()
            self.pos += n * sz
            return MetaValue(arr.tolist(), vt, sub)
        fmt, sz = _SCALAR[vt]
        return MetaValue(self.unpack(fmt, sz), vt)


class GGUFFile:
    """Parsed GGUF file: ``metadata`` (ordered dict key -> MetaValue), ``tensors`` (list of TensorEntry)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise InputFileError("no such file", self.path)
        if self.path.is_dir():
            raise InputFileError("is a folder, not a GGUF file", self.path)
        try:
            self._f = open(self.path, "rb")
            size = os.fstat(self._f.fileno()).st_size
        except OSError as e:
            raise InputFileError(f"cannot read: {e.strerror}", self.path) from None
        if size < 24:
            self._f.close()
            raise InputFileError(f"not a GGUF file (only {size} bytes)", self.path)
        self._mm = mmap.mmap(self._f.fileno(), 0, access=mmap.ACCESS_READ)
        self.size = size
        try:
            self._parse()
        except InputFileError:
            self.close()
            raise
        except (struct.error, ValueError, OverflowError, MemoryError) as e:
            self.close()
            raise InputFileError(f"corrupt GGUF file: {e}", self.path) from None

    def _parse(self) -> None:
        c = _Cursor(self._mm, self.path)
        if bytes(self._mm[:4]) != GGUF_MAGIC:
            raise InputFileError(f"not a GGUF file (magic {bytes(self._mm[:4])!r}, expected b'GGUF')", self.path)
        c.pos = 4
        self.version = c.unpack("<I", 4)
        if self.version not in (2, 3):
            raise InputFileError(f"unsupported GGUF version {self.version} (big-endian or too new?)", self.path)
        n_tensors = c.unpack("<Q", 8)
        n_kv = c.unpack("<Q", 8)
        # every key and every tensor info takes at least 8 (+4, +8) bytes: counts past that are corrupt
        if n_tensors > self.size // 24 or n_kv > self.size // 12:
            raise InputFileError(f"corrupt GGUF header ({n_tensors} tensors, {n_kv} metadata keys "
                                 f"in a file of {self.size} bytes)", self.path)
        self.metadata: dict[str, MetaValue] = {}
        for _ in range(n_kv):
            key = c.string("metadata key")
            if key in self.metadata:
                raise InputFileError(f"corrupt GGUF file: metadata key {key!r} appears twice", self.path)
            self.metadata[key] = c.value(c.vtype())
        align = 32
        if "general.alignment" in self.metadata:
            mv = self.metadata["general.alignment"]
            align = mv.value
            if mv.vtype not in _INT_TYPES or isinstance(align, bool) or align <= 0 or align & (align - 1) \
                    or align > MAX_ALIGNMENT:
                raise InputFileError(f"invalid general.alignment {align!r} (a power of two up to "
                                     f"{MAX_ALIGNMENT} expected)", self.path)
        self.alignment = align
        raw = []
        for _ in range(n_tensors):
            name = c.string("tensor name")
            nd = c.unpack("<I", 4)
            if nd > MAX_DIMS:
                raise InputFileError(f"tensor {name!r} has {nd} dimensions (at most {MAX_DIMS})", self.path)
            ne = tuple(c.unpack("<Q", 8) for _ in range(nd))
            t = c.unpack("<I", 4)
            off = c.unpack("<Q", 8)
            raw.append((name, ne, t, off))
        data_start = (c.pos + align - 1) // align * align
        self.data_offset = data_start
        self.tensors: list[TensorEntry] = []
        seen = set()
        for name, ne, t, off in raw:
            if name in seen:
                raise InputFileError(f"tensor {name!r} appears twice", self.path)
            seen.add(name)
            try:
                gt = GGMLQuantizationType(t)
                bs, ts = GGML_QUANT_SIZES[gt]
            except (ValueError, KeyError):
                raise InputFileError(f"tensor {name!r} has unknown type id {t}", self.path) from None
            n = math.prod(ne)
            if any(d == 0 or d >= 1 << 63 for d in ne) or n >= 1 << 63:
                raise InputFileError(f"tensor {name!r} has impossible dimensions {list(ne)}", self.path)
            if ne and ne[0] % bs:
                raise InputFileError(f"tensor {name!r}: row of {ne[0]} is not whole {gt.name} blocks", self.path)
            if off % align:
                raise InputFileError(f"tensor {name!r}: data offset {off} is not a multiple of the alignment "
                                     f"{align}", self.path)
            nbytes = n // bs * ts
            start = data_start + off
            if start + nbytes > self.size:
                raise InputFileError(
                    f"truncated or corrupt: tensor {name!r} data ends at byte {start + nbytes}, "
                    f"past the end of the file ({self.size} bytes)", self.path)
            self.tensors.append(TensorEntry(name, ne, int(gt), start, nbytes))
        prev = None
        for t in sorted(self.tensors, key=lambda e: (e.offset, e.nbytes)):
            if prev is not None and t.offset < prev.offset + prev.nbytes:
                raise InputFileError(f"corrupt GGUF file: data of tensors {prev.name!r} and {t.name!r} overlap",
                                     self.path)
            if t.nbytes:
                prev = t
        self._by_name = {t.name: t for t in self.tensors}
        if any(k.startswith(CODEBOOK_META_PREFIX) for k in self.metadata):
            from ..gguf_types.codebook import check_codebook_layout  # only files with qgguf codebook tensors
            check_codebook_layout(self.metadata, {t.name: (t.ggml_type, t.ne) for t in self.tensors}, self.path)

    def get(self, key: str, default=None):
        mv = self.metadata.get(key)
        return default if mv is None else mv.value

    def tensor(self, name: str) -> TensorEntry:
        return self._by_name[name]

    def raw(self, name_or_entry) -> np.ndarray:
        """The tensor's bytes as a read-only uint8 view of the mapped file (no copy)."""
        t = name_or_entry if isinstance(name_or_entry, TensorEntry) else self._by_name[name_or_entry]
        return np.frombuffer(self._mm, dtype=np.uint8, count=t.nbytes, offset=t.offset)

    def close(self) -> None:
        mm, f = getattr(self, "_mm", None), getattr(self, "_f", None)
        self._mm = self._f = None
        if mm is not None:
            try:
                mm.close()
            except BufferError:  # views still alive: let the GC close it
                pass
        if f is not None:
            f.close()

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()
