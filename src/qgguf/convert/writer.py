"""Streaming, atomic GGUF writer.

Usage: ``plan_tensor`` every tensor (name, numpy shape, ggml type id, byte size) and ``set`` the
metadata, then ``open()`` writes header, metadata and tensor table to a temporary file in the
destination folder, ``write_tensor`` writes tensors one at a time in plan order, and ``commit()``
renames the file into place. Any exception (or Ctrl-C) inside ``with OutputFile(...)`` removes the
temporary file: there is never a partial file at the destination.

qgguf's own codebook types are written the same way: their bytes are stored under a standard
container type id (``plan_tensor(..., ggml_type=container)``) with ``qgguf.*`` metadata keys.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
from gguf import GGUFValueType, GGUFWriter

from ..errors import OutputError
from .ggufread import MetaValue

ALIGNMENT = 32
# metadata keys first in the file, in this order (then the rest as given)
_FIRST = ("general.type", "general.name")


class OutputFile:
    def __init__(self, path: str | os.PathLike, arch: str):
        self.path = Path(path)
        self.arch = arch
        self.metadata: dict[str, MetaValue] = {}
        self.plan: list[tuple[str, tuple[int, ...], int, int]] = []
        self._writer: GGUFWriter | None = None
        self._next = 0
        self.tmp: Path | None = None
        self._check_folder()

    def _check_folder(self) -> None:
        d = self.path.parent
        if self.path.is_dir():
            raise OutputError("is a folder; give a file name for the output", self.path)
        if not d.exists():
            raise OutputError("output folder does not exist", d)
        if not os.access(d, os.W_OK | os.X_OK):
            raise OutputError("output folder is not writable", d)

    # --- planning ------------------------------------------------------------------------------
    def set(self, key: str, value, vtype: GGUFValueType | None = None, sub_type=None) -> None:
        self.metadata[key] = value if isinstance(value, MetaValue) else MetaValue(value, vtype, sub_type)

    def update(self, md: dict[str, MetaValue]) -> None:
        self.metadata.update(md)

    def plan_tensor(self, name: str, shape: tuple[int, ...], ggml_type: int, nbytes: int) -> None:
        self.plan.append((name, tuple(int(s) for s in shape), int(ggml_type), int(nbytes)))

    def data_size(self) -> int:
        return sum((nb + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT for *_, nb in self.plan)

    # --- writing -------------------------------------------------------------------------------
    def open(self) -> None:
        need = self.data_size() + (16 << 20)
        free = shutil.disk_usage(self.path.parent).free
        if free < need:
            raise OutputError(f"not enough free disk space: need {need / 2**20:.0f} MiB, "
                              f"{free / 2**20:.0f} MiB free", self.path.parent)
        self.tmp = self.path.with_name(f".{self.path.name}.qgguf-tmp-{os.getpid()}")
        w = GGUFWriter(None, self.arch)
        keys = [k for k in _FIRST if k in self.metadata] + [k for k in self.metadata if k not in _FIRST]
        for k in keys:
            mv = self.metadata[k]
            if mv.vtype == GGUFValueType.ARRAY and len(mv.value) == 0:
                continue
            w.add_key_value(k, mv.value, mv.vtype, sub_type=mv.sub_type)
        for name, shape, gt, nb in self.plan:
            w.add_tensor_info(name, shape, np.dtype(np.float32), nb, raw_dtype=gt)
        try:
            w.write_header_to_file(self.tmp)
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
        except OSError as e:
            self._cleanup(w)
            raise OutputError(f"cannot write: {e.strerror}", self.path) from None
        self._writer = w

    def write_tensor(self, name: str, data: np.ndarray) -> None:
        pname, shape, gt, nb = self.plan[self._next]
        if pname != name:
            raise RuntimeError(f"tensor {name} written out of plan order (expected {pname})")
        data = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
        if data.nbytes != nb:
            raise RuntimeError(f"tensor {name}: {data.nbytes} bytes, planned {nb}")
        try:
            self._writer.write_tensor_data(data)
        except OSError as e:
            raise OutputError(f"cannot write: {e.strerror}", self.path) from None
        self._next += 1

    def commit(self) -> None:
        if self._next != len(self.plan):
            raise RuntimeError(f"only {self._next} of {len(self.plan)} tensors written")
        w = self._writer
        try:
            w.flush()
            w.close()
            os.replace(self.tmp, self.path)
        except OSError as e:
            raise OutputError(f"cannot write: {e.strerror}", self.path) from None
        self._writer = None
        self.tmp = None

    def _cleanup(self, w=None) -> None:
        w = w or self._writer
        if w is not None:
            try:
                w.close()
            except Exception:
                pass
        self._writer = None
        if self.tmp is not None:
            try:
                self.tmp.unlink()
            except FileNotFoundError:
                pass
            self.tmp = None

    def abort(self) -> None:
        self._cleanup()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None or self.tmp is not None:
            self.abort()
        return False


# --- qgguf extension: sparse outliers (docs/FORMAT.md, "qgguf extensions: sparse outliers") ------------
OUTLIER_IDX = ".outlier_idx"    # I32 (ggml type 26), flat indices row * ncols + col, increasing
OUTLIER_VAL = ".outlier_val"    # F16 (ggml type 1), added to the dense weight at those positions
_I32, _F16 = 26, 1


def plan_outliers(of: OutputFile, name: str, count: int) -> None:
    """Plan the companion tensors of ``name``'s sparse part (right after ``name``)."""
    of.plan_tensor(name + OUTLIER_IDX, (int(count),), _I32, 4 * int(count))
    of.plan_tensor(name + OUTLIER_VAL, (int(count),), _F16, 2 * int(count))


def write_outliers(of: OutputFile, name: str, idx: np.ndarray, vals: np.ndarray) -> int:
    """Write the planned companion tensors; returns their bytes."""
    idx = np.ascontiguousarray(idx, dtype="<i4").reshape(-1)
    vals = np.ascontiguousarray(vals, dtype="<f2").reshape(-1)
    if idx.shape != vals.shape:
        raise RuntimeError(f"{name}: {idx.size} outlier indices but {vals.size} values")
    if idx.size > 1 and not np.all(np.diff(idx) > 0):
        raise RuntimeError(f"{name}: outlier indices must be strictly increasing")
    of.write_tensor(name + OUTLIER_IDX, idx)
    of.write_tensor(name + OUTLIER_VAL, vals)
    return int(idx.nbytes + vals.nbytes)


def outlier_rows(g) -> list[dict] | None:
    """``qgguf inspect`` rows for a file with sparse outliers (None: the file has none): each dense tensor
    with companions gets ``outliers`` (count) and its bytes include the companions, which get no row."""
    if g.get("qgguf.version") is None:
        return None
    from gguf import GGMLQuantizationType
    by = {t.name: t for t in g.tensors}
    comp = {n for n in by if n.endswith((OUTLIER_IDX, OUTLIER_VAL)) and
            n.rsplit(".", 1)[0] in by}
    if not comp:
        return None
    rows = []
    for t in g.tensors:
        if t.name in comp:
            continue
        n = int(np.prod(t.ne)) if t.ne else 1
        nb = int(t.nbytes)
        row = {"name": t.name, "type": GGMLQuantizationType(t.ggml_type).name, "shape": list(t.ne), "params": n}
        if t.name + OUTLIER_IDX in by:
            k = int(np.prod(by[t.name + OUTLIER_IDX].ne))
            nb += int(by[t.name + OUTLIER_IDX].nbytes) + int(by[t.name + OUTLIER_VAL].nbytes)
            row["outliers"] = k
        row["bytes"] = nb
        row["bpw"] = 8.0 * nb / max(1, n)
        rows.append(row)
    return rows
