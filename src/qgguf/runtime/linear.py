"""Weight matrices of the torch runner ("linear kinds").

A GGUF weight of numpy shape ``(out_features, in_features)`` (GGUF shape ``[in, out]``) becomes a module
whose ``forward(x)`` computes ``x @ W.T`` for ``x`` of shape ``(..., in_features)``, and whose ``embed(ids)``
returns rows of ``W`` (used for ``token_embd.weight``, which is also the output matrix of tied models).

:func:`make_linear` picks the kind for a tensor type:

* a kind registered with :func:`register_linear_kind` for that type (by ggml type id or by type name):
  this is how codebook types (qgguf's AQ/VQ) plug in with their own native kernels, keeping their
  weights compressed in memory;
* otherwise :class:`DenseLinear`: the data is dequantized once, at load, through the tensor-type
  registry :mod:`qgguf.gguf_types`, and kept as float32.

qgguf's codebook tensors (AQ, docs/FORMAT.md "AQ tensors") have no tensor of their own name: a weight ``NAME``
is its companions ``NAME.aq_codes`` ... plus ``qgguf.tensor.NAME.*`` metadata. :func:`codebook_linear` finds
them by name, validates their containers and shapes against the metadata (:class:`QggufError` otherwise) and
builds the module registered for the family with :func:`register_codebook_kind` (:class:`AQLinear` for
``aq``: compressed in memory, native kernels, or a torch fallback that dequantizes per call).
:func:`load_llama` loads a GGUF (plain or with qgguf tensors) into :class:`~qgguf.runtime.model.LlamaModel`.
"""
from __future__ import annotations

import os
from typing import Callable, Mapping, Union

import numpy as np
import torch

from ..errors import QggufError, UnsupportedModelError
from .actquant import rounder_for

TypeKey = Union[int, str]
# factory(name, tensor_type, shape, raw_data) -> LinearBase
LinearFactory = Callable[[str, int, tuple, np.ndarray], "LinearBase"]

_KINDS: dict[TypeKey, LinearFactory] = {}


class LinearBase(torch.nn.Module):
    """Interface of a weight matrix: ``forward(x)`` = ``x @ W.T``; ``embed(ids)`` = ``W[ids]``."""

    kind = "base"

    def __init__(self, name: str, out_features: int, in_features: int):
        super().__init__()
        self.name = name
        self.out_features = int(out_features)
        self.in_features = int(in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``W[ids]`` as float32 (the token-embedding lookup, ggml's get_rows)."""
        raise UnsupportedModelError(f"tensor {self.name} ({self.kind}) cannot be used as a token embedding")

    def dense_weight(self) -> torch.Tensor:
        """The full weight as float32 ``(out_features, in_features)`` (for tools and tests)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"{self.name}: {self.in_features} -> {self.out_features} ({self.kind})"


class DenseLinear(LinearBase):
    """A float32 weight held in memory (any standard type, dequantized at load)."""

    kind = "dense"

    def __init__(self, name: str, weight: torch.Tensor, source_type: str = "F32"):
        weight = weight.to(torch.float32).contiguous()
        super().__init__(name, weight.shape[0], weight.shape[1])
        self.source_type = source_type
        self.register_buffer("weight", weight, persistent=False)
        # llama.cpp rounds the activations to the weight type's vec_dot_type first (see actquant.py)
        self.round_input = rounder_for(source_type)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.round_input is not None:
            x = self.round_input(x)
        return torch.nn.functional.linear(x, self.weight)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.embedding(ids, self.weight)

    def dense_weight(self) -> torch.Tensor:
        return self.weight

    def extra_repr(self) -> str:
        return f"{self.name}: {self.in_features} -> {self.out_features} (dense from {self.source_type})"


def register_linear_kind(type_key: TypeKey, factory: LinearFactory, *, replace: bool = False) -> None:
    """Use ``factory(name, tensor_type, shape, raw_data)`` for tensors of ``type_key``
    (a ggml type id, or a type name as in :mod:`qgguf.gguf_types`, case-insensitive)."""
    key = type_key.upper() if isinstance(type_key, str) else int(type_key)
    if key in _KINDS and not replace:
        raise ValueError(f"a linear kind for {type_key!r} is already registered")
    _KINDS[key] = factory


def _type_name(tensor_type: int) -> str | None:
    try:
        import gguf

        return gguf.GGMLQuantizationType(int(tensor_type)).name
    except (ValueError, ImportError):
        return None


def dequantize_tensor(name: str, tensor_type: int, shape: tuple, raw_data: np.ndarray) -> np.ndarray:
    """Float32 array of ``shape`` from a tensor's raw bytes, through the tensor-type registry."""
    from .. import gguf_types
    from ..errors import QggufError

    try:
        qt = gguf_types.by_ggml(int(tensor_type))
    except QggufError:
        w = _dequantize_with_gguf_py(name, tensor_type, shape, raw_data)
        if w is not None:
            return w
        tname = _type_name(tensor_type) or f"id {int(tensor_type)}"
        raise UnsupportedModelError(f"tensor {name} has type {tname}, which qgguf cannot load yet") from None
    raw = np.ascontiguousarray(raw_data).view(np.uint8)
    expected = qt.nbytes(tuple(int(s) for s in shape))
    if raw.size != expected:
        raise UnsupportedModelError(
            f"tensor {name}: {raw.size} bytes of {qt.name} data for shape {tuple(shape)} (expected {expected})")
    return qt.dequantize(raw, tuple(int(s) for s in shape))


#: ggml types that qgguf reads but does not write (llama.cpp's i-quants with lattice grids): their dequantization
#: is gguf-py's (``gguf.quants``), so that llama.cpp's own IQ2_XXS ... files can be evaluated beside ours
READ_ONLY_GGML = ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M", "IQ4_XS")


def _dequantize_with_gguf_py(name: str, tensor_type: int, shape: tuple, raw_data: np.ndarray) -> np.ndarray | None:
    """Float32 of ``shape`` through gguf-py's dequantizer for a :data:`READ_ONLY_GGML` type (None: not one)."""
    tname = _type_name(tensor_type)
    if tname not in READ_ONLY_GGML:
        return None
    import gguf
    from gguf import quants

    qtype = gguf.GGMLQuantizationType[tname]
    block, tsize = gguf.GGML_QUANT_SIZES[qtype]
    shape = tuple(int(s) for s in shape)
    n = shape[-1]
    if n % block:
        raise UnsupportedModelError(f"tensor {name}: rows of {n} values do not divide into {tname} blocks of {block}")
    rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    raw = np.ascontiguousarray(raw_data).view(np.uint8).reshape(-1)
    if raw.size != rows * (n // block) * tsize:
        raise UnsupportedModelError(f"tensor {name}: {raw.size} bytes of {tname} data for shape {shape} "
                                    f"(expected {rows * (n // block) * tsize})")
    w = quants.dequantize(raw.reshape(rows, -1), qtype)
    return np.ascontiguousarray(w, dtype=np.float32).reshape(shape)


def make_linear(name: str, tensor_type: int, shape: tuple, raw_data: np.ndarray) -> LinearBase:
    """Module for the weight ``name`` of ggml ``tensor_type``, numpy ``shape`` ``(out, in)`` and raw bytes."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 2:
        raise UnsupportedModelError(f"tensor {name} has shape {shape}; a weight matrix must be 2-D")
    factory = _KINDS.get(int(tensor_type))
    if factory is None:
        tname = _type_name(tensor_type)
        if tname is None:
            try:
                from .. import gguf_types

                tname = gguf_types.by_ggml(int(tensor_type)).name
            except Exception:
                tname = None
        if tname is not None:
            factory = _KINDS.get(tname.upper())
    if factory is not None:
        return factory(name, int(tensor_type), shape, raw_data)
    w = dequantize_tensor(name, tensor_type, shape, raw_data)
    return DenseLinear(name, torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)),
                       source_type=_type_name(tensor_type) or str(tensor_type))


# ------------------------------------------------------------------------------------------------
# codebook tensors (AQ, later VQ)

# family -> factory(name, codebook type, numpy shape (R, C), Companions) -> LinearBase
_CODEBOOK_KINDS: dict[str, Callable] = {}


def register_codebook_kind(family: str, factory: Callable, *, replace: bool = False) -> None:
    """Use ``factory(name, qtype, shape, companions)`` for codebook tensors of ``family`` (e.g. ``"aq"``)."""
    if family in _CODEBOOK_KINDS and not replace:
        raise ValueError(f"a linear kind for codebook family {family!r} is already registered")
    _CODEBOOK_KINDS[family] = factory


# threads of the native kernels; None: torch's thread count (set by the runner's --threads)
NATIVE_THREADS: int | None = None


def set_native_threads(n: int | None) -> None:
    """Threads of the native AQ/VQ kernels (None: follow ``torch.get_num_threads()``). The decode loop runs
    the small torch ops on one thread and the weight kernels on ``n``: on a loaded machine, torch's OpenMP
    barriers for microsecond-sized ops cost more than they save."""
    global NATIVE_THREADS
    NATIVE_THREADS = None if n is None else max(1, int(n))


def _threads_now() -> int:
    return NATIVE_THREADS if NATIVE_THREADS is not None else max(1, int(torch.get_num_threads()))


def _native_linear(t, x: torch.Tensor, n_in: int, n_out: int) -> torch.Tensor:
    """``x W^T`` through a native codebook tensor ``t`` (AQTensor, VQTensor): its matvec kernel for one token,
    its matmul for several."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, n_in)
    if x2.dtype != torch.float32 or not x2.is_contiguous():
        x2 = x2.to(torch.float32).contiguous()
    xn = x2.numpy()
    y = t.matvec(xn[0], _threads_now()) if xn.shape[0] == 1 else t.matmul(xn, _threads_now())
    return torch.from_numpy(y).view(*lead, n_out)


class AQLinear(LinearBase):
    """An AQ weight kept compressed: native :class:`qgguf.native.AQTensor` (matvec for one token, matmul for
    several), or, without the native module (or for a group size it has no kernel for), a torch fallback that
    keeps codes/codebooks/scales and dequantizes per call."""

    kind = "aq"

    def __init__(self, name: str, qt, shape: tuple[int, int], comp, native_ok: bool | None = None):
        R, C = int(shape[0]), int(shape[1])
        super().__init__(name, R, C)
        from .. import native
        from ..gguf_types.codebook import AQ_CODEBOOKS, AQ_CODES, AQ_SCALES
        self.qt = qt
        codes, cb, sc = comp[AQ_CODES], comp[AQ_CODEBOOKS], comp[AQ_SCALES]
        if native_ok is None:
            native_ok = native.available() and qt.g in native.AQ_GROUP_SIZES
        self.native = None
        if native_ok:
            self.native = native.AQTensor(np.ascontiguousarray(codes).reshape(-1), cb, sc, M=qt.M, B=qt.B, g=qt.g,
                                          R=R, C=C)
        else:
            c = np.ascontiguousarray(codes)
            c = c.view(np.int16) if qt.B == 16 else c
            self.register_buffer("codes", torch.from_numpy(c.reshape(C // qt.g, qt.M, R).copy()), persistent=False)
            self.register_buffer("codebooks", torch.from_numpy(np.asarray(cb, np.float32).copy()), persistent=False)
            self.register_buffer("scales", torch.from_numpy(np.asarray(sc, np.float32).copy()), persistent=False)

    @property
    def nbytes(self) -> int:
        if self.native is not None:
            return int(self.native.nbytes)
        return sum(int(b.numel() * b.element_size()) for b in (self.codes, self.codebooks, self.scales))

    def _torch_dense(self, r0: int = 0, r1: int | None = None) -> torch.Tensor:
        codes = self.codes
        if self.qt.B == 16:
            codes = codes.to(torch.int32) & 0xFFFF
        idx = codes[:, :, r0:r1].long()                      # [J, M, r]
        J, M, r = idx.shape
        acc = torch.zeros(r, J, self.qt.g)
        for m in range(M):
            acc += self.codebooks[m][idx[:, m, :].T]           # [r, J, g]
        acc *= self.scales[r0:r1][:, None, None]
        return acc.reshape(r, J * self.qt.g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native is None:
            return torch.nn.functional.linear(x, self._torch_dense())
        return _native_linear(self.native, x, self.in_features, self.out_features)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(ids, dtype=torch.long)
        flat = ids.reshape(-1).tolist()
        out = torch.empty(len(flat), self.in_features)
        for i, r in enumerate(flat):
            if self.native is not None:
                out[i] = torch.from_numpy(self.native.dequantize(int(r), int(r) + 1)[0])
            else:
                out[i] = self._torch_dense(int(r), int(r) + 1)[0]
        return out.view(*ids.shape, self.in_features)

    def dense_weight(self) -> torch.Tensor:
        if self.native is not None:
            return torch.from_numpy(self.native.dequantize(threads=_threads_now()))
        return self._torch_dense()

    def extra_repr(self) -> str:
        how = "native " + __import__("qgguf.native", fromlist=["isa"]).isa() if self.native is not None else "torch"
        return f"{self.name}: {self.in_features} -> {self.out_features} ({self.qt.name}, {how})"


register_codebook_kind("aq", lambda name, qt, shape, comp: AQLinear(name, qt, shape, comp))


def tiered_linear(name: str, qt, shape: tuple[int, int], comp) -> DenseLinear:
    """A row-tiered weight (gguf_types/tiers.py): its tiers are standard types, which the runner holds as float32
    like any standard weight, so it is dequantized once, rows put back in their order. Activations are rounded as
    llama.cpp would for the tiers' types when they all round alike (Q8_0, Q5_0, IQ4_NL, ...), else not at all."""
    try:
        w = torch.from_numpy(np.ascontiguousarray(qt.dequantize(comp, tuple(shape)), np.float32))
    except QggufError as e:   # a corrupt row list: name the tensor (the reader adds the file)
        raise QggufError(f"tensor {name}: {e.problem}") from None
    kinds = {rounder_for(t.name) for t, _ in qt.tiers}
    lin = DenseLinear(name, w, qt.tiers[0][0].name if len(kinds) == 1 else "F32")
    lin.source_type = qt.name
    return lin


register_codebook_kind("tiers", tiered_linear)


class VQLinear(LinearBase):
    """A VQ weight kept compressed (bit-packed indices, codebooks, permutation, column norms): native
    :class:`qgguf.native.VQTensor` (matvec for one token, matmul for several), or, without the native module,
    a fallback that keeps the companions and dequantizes per call (numpy reference of the format)."""

    kind = "vq"

    def __init__(self, name: str, qt, shape: tuple[int, int], comp, native_ok: bool | None = None):
        R, C = int(shape[0]), int(shape[1])
        super().__init__(name, R, C)
        from .. import native
        from ..gguf_types import vq as V
        self.qt = qt
        L = qt.layout((R, C))
        if native_ok is None:
            native_ok = native.available()
        self.native = None
        self.comp = None
        if native_ok:
            self.native = native.VQTensor(
                np.ascontiguousarray(comp[V.VQ_IDX]).view(np.uint8).reshape(-1), comp[V.VQ_BOOKS],
                np.asarray(comp[V.VQ_PERM]), np.asarray(comp[V.VQ_COLSCALE]), np.asarray(comp[V.VQ_COLBIAS]),
                v=qt.v, k=qt.k, R=R, C=C,
                ridx=np.ascontiguousarray(comp[V.VQ_RIDX]).view(np.uint8).reshape(-1) if qt.kr else None,
                rbooks=comp[V.VQ_RBOOKS] if qt.kr else None, kr=qt.kr,
                obook=comp[V.VQ_OBOOK] if L["n_out"] else None, n_out=L["n_out"], groups=qt.groups)
        else:
            self.comp = {k: np.array(v, copy=True) for k, v in comp.items()}

    @property
    def nbytes(self) -> int:
        if self.native is not None:
            return int(self.native.nbytes)
        return int(sum(a.nbytes for a in self.comp.values()))

    def _dense(self) -> torch.Tensor:
        return torch.from_numpy(self.qt.dequantize(self.comp, (self.out_features, self.in_features)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native is None:
            return torch.nn.functional.linear(x, self._dense())
        return _native_linear(self.native, x, self.in_features, self.out_features)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(ids, dtype=torch.long)
        flat = ids.reshape(-1).tolist()
        out = torch.empty(len(flat), self.in_features)
        dense = None if self.native is not None else self._dense()
        for i, r in enumerate(flat):
            out[i] = torch.from_numpy(self.native.dequantize(int(r), int(r) + 1)[0]) if dense is None else dense[r]
        return out.view(*ids.shape, self.in_features)

    def dense_weight(self) -> torch.Tensor:
        if self.native is not None:
            return torch.from_numpy(self.native.dequantize(threads=_threads_now()))
        return self._dense()

    def extra_repr(self) -> str:
        how = "native " + __import__("qgguf.native", fromlist=["isa"]).isa() if self.native is not None else "numpy"
        return f"{self.name}: {self.in_features} -> {self.out_features} ({self.qt.name}, {how})"


register_codebook_kind("vq", lambda name, qt, shape, comp: VQLinear(name, qt, shape, comp))


def _meta_value(md: Mapping, key: str):
    v = md.get(key)
    v = getattr(v, "value", v)
    if isinstance(v, (bytes, bytearray)):
        v = v.decode()
    return v


# where codebook weights are applied: "cpu" (native kernels) or "cuda" (qgguf.native.cuda, compressed on the GPU;
# falls back to "cpu" with a warning when CuPy or a GPU is missing). Default from QGGUF_CODEBOOK_DEVICE.
CODEBOOK_DEVICE = os.environ.get("QGGUF_CODEBOOK_DEVICE", "cpu").strip().lower() or "cpu"


def set_codebook_device(device: str) -> None:
    """Apply codebook (AQ/VQ) weights loaded from now on with the CPU kernels (``"cpu"``) or the CUDA kernels
    (``"cuda"``)."""
    global CODEBOOK_DEVICE
    if device not in ("cpu", "cuda"):
        raise QggufError(f"codebook device must be cpu or cuda, got {device!r}")
    CODEBOOK_DEVICE = device


def codebook_shape(name: str, md: Mapping, path=None) -> tuple[int, int] | None:
    """numpy shape ``(R, C)`` of codebook tensor ``name`` from ``qgguf.tensor.NAME.shape`` (None: not one)."""
    if _meta_value(md, f"qgguf.tensor.{name}.config") is None:
        return None
    shp = _meta_value(md, f"qgguf.tensor.{name}.shape")
    if shp is None or len(list(shp)) != 2:
        raise QggufError(f"tensor {name}: qgguf.tensor.{name}.shape must be [in, out], got {shp!r}", path)
    C, R = (int(v) for v in shp)
    return R, C


def codebook_companions(name: str, tensors: Mapping, md: Mapping, path=None):
    """``(qtype, numpy shape (R, C), Companions)`` of codebook tensor ``name``, or None if ``name`` is not one.
    ``tensors``: ``{name: gguf.ReaderTensor}`` (anything with ``.tensor_type``, ``.shape`` in GGUF order and
    ``.data``); ``md``: the file's metadata (plain values or MetaValue). Every companion must exist with the
    container type and GGUF shape that the type gives for the shape in the metadata."""
    from .. import gguf_types
    from ..gguf_types.codebook import Companions, is_codebook

    cfg = _meta_value(md, f"qgguf.tensor.{name}.config")
    if cfg is None:
        return None
    try:
        qt = gguf_types.get(str(cfg))
    except QggufError:
        raise QggufError(f"tensor {name}: unknown qgguf type {cfg!r}", path) from None
    if not is_codebook(qt):
        raise QggufError(f"tensor {name}: qgguf type {cfg!r} is not a codebook type", path)
    fam = _meta_value(md, f"qgguf.tensor.{name}.type")
    if fam is not None and str(fam) != qt.family:
        raise QggufError(f"tensor {name}: qgguf.tensor.{name}.type is {fam!r} but its config {cfg!r} is "
                         f"{qt.family!r}", path)
    shape = codebook_shape(name, md, path)
    try:
        specs = qt.companion_specs(shape)
    except QggufError as e:
        raise QggufError(f"tensor {name}: {e.problem}", path) from None
    comp = Companions()
    for sp in specs:
        t = tensors.get(name + sp.suffix)
        if t is None:
            raise QggufError(f"tensor {name} ({qt.name}): companion tensor {name}{sp.suffix} is missing", path)
        tt = int(t.tensor_type)
        ne = tuple(int(v) for v in t.shape)
        while len(ne) > len(sp.gguf_shape) and ne[-1] == 1:
            ne = ne[:-1]
        if tt != sp.ggml_type or ne != sp.gguf_shape:
            got = _type_name(tt) or str(tt)
            raise QggufError(f"tensor {name} ({qt.name}, shape {list(reversed(shape))}): companion "
                             f"{name}{sp.suffix} is {got} {list(ne)}, expected {sp.container} "
                             f"{list(sp.gguf_shape)}", path)
        raw = np.asarray(t.data)
        comp[sp.suffix] = raw.view(np.uint8).reshape(-1).view(sp.dtype).reshape(sp.array_shape)
    return qt, shape, comp


def codebook_linear(name: str, tensors: Mapping, md: Mapping, expect: tuple[int, int] | None = None,
                    path=None) -> LinearBase | None:
    """The module for codebook tensor ``name`` (:func:`codebook_companions`), or None if it is not one."""
    got = codebook_companions(name, tensors, md, path)
    if got is None:
        return None
    qt, shape, comp = got
    if expect is not None and tuple(shape) != tuple(int(v) for v in expect):
        raise UnsupportedModelError(f"tensor {name} has shape {tuple(shape)}, expected {tuple(expect)}", path)
    factory = _CODEBOOK_KINDS.get(qt.family)
    if factory is None:
        raise UnsupportedModelError(f"tensor {name}: no runtime kind for codebook family {qt.family!r}", path)
    if CODEBOOK_DEVICE == "cuda" and qt.family in ("aq", "vq"):   # the CUDA kernels (qgguf.native.cuda); None:
        # unavailable, CPU kind (a row-tiered matrix is standard types: dense, as the runner holds those)
        from ..native.cuda.linear import cuda_codebook_linear
        lin = cuda_codebook_linear(name, qt, shape, comp)
        if lin is not None:
            return lin
    try:
        return factory(name, qt, shape, comp)
    except QggufError as e:
        raise e.at(path) from None


def _codebook_source(reader, path, md: dict):
    """A :class:`qgguf.runtime.model._TensorSource` that also serves codebook tensors by their weight name."""
    from .model import _TensorSource

    class _CodebookSource(_TensorSource):
        def __init__(self):
            super().__init__(reader, path)
            self.md = md
            self.cb_shapes = {}
            for k in md:
                if k.startswith("qgguf.tensor.") and k.endswith(".config"):
                    n = k[len("qgguf.tensor."):-len(".config")]
                    self.cb_shapes[n] = codebook_shape(n, md, path)

        def has(self, name):
            return name in self.cb_shapes or super().has(name)

        def shape(self, name):
            if name in self.cb_shapes:
                return self.cb_shapes[name]
            return super().shape(name)

        def linear(self, name, expect, optional=False):
            if name in self.cb_shapes:
                lin = codebook_linear(name, self.tensors, self.md, expect, path)
                sparse = self.outliers(name)
                if sparse is not None:
                    from .model import add_sparse
                    lin = add_sparse(lin, *sparse)
                return lin
            return super().linear(name, expect, optional)

    return _CodebookSource()


def has_codebook_tensors(md: Mapping) -> bool:
    return any(k.startswith("qgguf.tensor.") and k.endswith(".config") for k in md)


def load_llama(path, threads: int | None = None):
    """The runner's loader (:meth:`LlamaModel.from_gguf`), which handles plain and codebook (AQ) files alike."""
    from .model import LlamaModel

    return LlamaModel.from_gguf(path, threads=threads)


def _drop_mapped_pages(reader) -> None:
    """Let the kernel drop the file pages that loading touched (MADV_DONTNEED on the read-only mapping): the
    native kernels read their own copies (tiled codes) on the fast path, so the mapped copy need not stay
    resident; any later read just faults the pages back from the page cache. Keeps RSS close to the file size."""
    import mmap
    mm = getattr(getattr(reader, "data", None), "_mmap", None)
    if mm is None or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return
    try:
        mm.madvise(mmap.MADV_DONTNEED)
    except (OSError, ValueError):
        pass


__all__ = ["LinearBase", "DenseLinear", "AQLinear", "VQLinear", "make_linear", "register_linear_kind", "register_codebook_kind",
           "dequantize_tensor", "codebook_linear", "codebook_companions", "load_llama"]
