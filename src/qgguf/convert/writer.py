"""Streaming, atomic GGUF writer.

Usage: ``plan_tensor`` every tensor (name, numpy shape, ggml type id, byte size) and ``set`` the
metadata, then ``open()`` writes header, metadata and tensor table to a temporary file in the
destination folder, ``write_tensor`` writes tensors one at a time in plan order, and ``commit()``
renames the file into place. Any exception (or Ctrl-C) inside ``with OutputFile(...)`` removes the
temporary file: there is never a partial file at the destination. A process killed outright (SIGKILL, power
loss) cannot clean up; its ``.NAME.qgguf-tmp-PID`` file is removed by the next writer of the same destination once
that PID is gone (:meth:`OutputFile.remove_stale_temps`). The folder is checked up front (exists, writable: a probe
file is created and removed), and :meth:`OutputFile.check_space` compares the expected bytes with the free space
before any work (``open()`` checks again with the exact plan).

qgguf's own codebook types (AQ, ...) have no ggml type id: ``plan_qtensor(name, shape, qtype)`` plans any
type - a standard one as one tensor, a codebook type as its companion tensors ``NAME.aq_codes`` ... in standard
container types (``qtype.companions(shape)``), and adds the ``qgguf.*`` metadata keys (``qgguf.version`` and
``qgguf.tensor.NAME.*``); ``write_tensor(NAME, data)`` then takes the type's packed data (the
:class:`~qgguf.gguf_types.codebook.Companions` of ``qtype.pack``, any ``{suffix: array}`` mapping, or the
flat blob ``np.asarray(packed)``) and writes every companion. A file with no qgguf type and no other ``qgguf.*``
key stays a plain llama.cpp file (:attr:`OutputFile.needs_qgguf_runner` is False).
"""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from gguf import GGUFValueType, GGUFWriter

from ..errors import OutputError
from .ggufread import MetaValue

ALIGNMENT = 32
TMP_INFIX = ".qgguf-tmp-"
#: bytes of room kept on top of the planned tensor data (header, metadata, the file system's own blocks)
SPACE_MARGIN = 16 << 20
# metadata keys first in the file, in this order (then the rest as given)
_FIRST = ("general.type", "general.name")


class OutputFile:
    def __init__(self, path: str | os.PathLike, arch: str):
        self.path = Path(path)
        self.arch = arch
        self.metadata: dict[str, MetaValue] = {}
        self.plan: list[tuple[str, tuple[int, ...], int, int]] = []
        self.codebook: dict[str, tuple[object, tuple[int, ...]]] = {}   # NAME -> (CodebookType, numpy shape)
        self._writer: GGUFWriter | None = None
        self._next = 0
        self.tmp: Path | None = None
        self._check_folder()
        self.remove_stale_temps()   # before the free-space check: a dead writer's file is not in the way

    def _check_folder(self) -> None:
        d = self.path.parent
        if self.path.is_dir():
            raise OutputError("is a folder; give a file name for the output", self.path)
        if not d.exists():
            raise OutputError("output folder does not exist", d)
        if not os.access(d, os.W_OK | os.X_OK):
            raise OutputError("output folder is not writable", d)
        try:   # root passes os.access on a read-only mount or a folder it may not write: try it
            fd, probe = tempfile.mkstemp(prefix=f".{self.path.name}.qgguf-probe-", dir=d)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            why = "read-only file system" if e.errno == errno.EROFS else (e.strerror or str(e))
            raise OutputError(f"output folder is not writable ({why})", d) from None

    def _tmp_path(self, pid: int) -> Path:
        return self.path.with_name(f".{self.path.name}{TMP_INFIX}{pid}")

    def remove_stale_temps(self) -> list[Path]:
        """Remove the temporary files that killed writers of this destination left (their PID no longer runs);
        returns them. A live writer's file is left alone."""
        removed = []
        prefix = f".{self.path.name}{TMP_INFIX}"
        try:
            entries = list(os.scandir(self.path.parent))
        except OSError:
            return removed
        for e in entries:
            if not e.name.startswith(prefix) or not e.name[len(prefix):].isdigit():
                continue
            pid = int(e.name[len(prefix):])
            if pid == os.getpid() or _pid_alive(pid):
                continue
            try:
                os.unlink(e.path)
                removed.append(Path(e.path))
            except OSError:
                pass
        return removed

    def check_space(self, need: int, what: str = "the output") -> None:
        """Refuse up front (OutputError naming the folder, the bytes needed and free) when the destination folder
        has less than ``need`` bytes free."""
        d = self.path.parent
        try:
            free = shutil.disk_usage(d).free
        except OSError as e:
            raise OutputError(f"cannot read the free space: {e.strerror}", d) from None
        if free < need:
            raise OutputError(f"not enough free disk space for {what}: need {need:,} bytes ({need / 2**20:,.0f} MiB), "
                              f"{free:,} bytes ({free / 2**20:,.0f} MiB) free", d)

    # --- planning ------------------------------------------------------------------------------
    def set(self, key: str, value, vtype: GGUFValueType | None = None, sub_type=None) -> None:
        self.metadata[key] = value if isinstance(value, MetaValue) else MetaValue(value, vtype, sub_type)

    def update(self, md: dict[str, MetaValue]) -> None:
        self.metadata.update(md)

    def plan_tensor(self, name: str, shape: tuple[int, ...], ggml_type: int, nbytes: int) -> None:
        if ggml_type is None:
            raise RuntimeError(f"tensor {name}: a qgguf codebook type has no ggml type id; plan it with "
                               "plan_qtensor(name, shape, qtype)")
        self.plan.append((name, tuple(int(s) for s in shape), int(ggml_type), int(nbytes)))

    def plan_qtensor(self, name: str, shape: tuple[int, ...], qt) -> int:
        """Plan ``name`` of numpy ``shape`` in tensor type ``qt`` (a :class:`~qgguf.gguf_types.QuantType`):
        one tensor for a standard type; the companions and ``qgguf.*`` keys for a codebook type. Returns
        the planned bytes."""
        from ..gguf_types.codebook import QGGUF_FORMAT_VERSION, is_codebook
        shape = tuple(int(s) for s in shape)
        if not is_codebook(qt):
            nb = qt.nbytes(shape)
            self.plan_tensor(name, shape, qt.ggml_type, nb)
            return nb
        if name in self.codebook:
            raise RuntimeError(f"tensor {name} planned twice")
        nb = 0
        for spec in qt.companion_specs(shape):
            self.plan_tensor(name + spec.suffix, spec.shape, spec.ggml_type, spec.nbytes)
            nb += spec.nbytes
        self.codebook[name] = (qt, shape)
        if "qgguf.version" not in self.metadata:
            self.set("qgguf.version", QGGUF_FORMAT_VERSION, GGUFValueType.UINT32)
        self.update(qt.metadata(name, shape))
        return nb

    @property
    def needs_qgguf_runner(self) -> bool:
        """The file uses qgguf extensions (codebook tensors, sparse outliers): stock llama.cpp cannot load it."""
        return bool(self.codebook) or any(k.startswith("qgguf.") for k in self.metadata)

    def data_size(self) -> int:
        return sum((nb + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT for *_, nb in self.plan)

    # --- writing -------------------------------------------------------------------------------
    def open(self) -> None:
        self.remove_stale_temps()
        self.check_space(self.data_size() + SPACE_MARGIN)
        self.tmp = self._tmp_path(os.getpid())
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

    def write_tensor(self, name: str, data) -> int:
        """Write the next planned tensor (for a codebook tensor: all its companions); returns its bytes."""
        cb = self.codebook.get(name)
        if cb is not None:
            qt, shape = cb
            comp = qt.as_companions(data, shape)
            total = 0
            for suffix, arr in comp.items():
                total += self._write_one(name + suffix, arr)
            return total
        return self._write_one(name, data)

    def _write_one(self, name: str, data) -> int:
        if self._next >= len(self.plan):
            raise RuntimeError(f"tensor {name} written but all {len(self.plan)} planned tensors are written")
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
        return nb

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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:   # EPERM: someone else's process
        return True
    return True


QGGUF_RUNNER_NOTE = ("NOTE: this file uses qgguf extensions ({what}); it needs the qgguf runner "
                     "(qgguf run/eval/bench, qgguf.load) - stock llama.cpp will not load it")


# --- qgguf extension: sparse outliers (docs/FORMAT.md, "qgguf extensions: sparse outliers") ------------
OUTLIER_IDX = ".outlier_idx"    # I32 (ggml type 26), flat indices row * ncols + col, increasing
OUTLIER_VAL = ".outlier_val"    # F16 (ggml type 1), added to the dense weight at those positions
_I32, _F16 = 26, 1


def set_outlier_keys(of: OutputFile, outliers: dict[str, int]) -> None:
    """The header keys of a file whose tensors ``outliers`` (name -> count) have sparse parts: ``qgguf.version``
    and ``qgguf.tensor.NAME.outliers`` (uint32)."""
    from ..gguf_types.codebook import QGGUF_FORMAT_VERSION
    if not outliers:
        return
    of.set("qgguf.version", QGGUF_FORMAT_VERSION, GGUFValueType.UINT32)
    for name, k in outliers.items():
        of.set(f"qgguf.tensor.{name}.outliers", int(k), GGUFValueType.UINT32)


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
    """``qgguf inspect`` rows for a file with qgguf extensions (kept for the callers that register it; the
    general provider is :func:`qgguf.convert.inspect.qgguf_rows`, which also folds codebook companions):
    each dense tensor with sparse-outlier companions gets ``outliers`` (count) and its bytes include them."""
    from .inspect import qgguf_rows
    return qgguf_rows(g)
